"""AdamW parameter groups and learning-rate schedules (linear warmup + cosine, warmup-stable-decay)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Literal, Optional, get_args

import torch
from torch import nn

ScheduleName = Literal["cosine", "wsd", "constant"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)


@dataclass
class OptimConfig:
    """AdamW and its schedule. Defaults follow common small-LM practice (GPT-3/Llama: betas 0.9/0.95, wd 0.1).

    Args:
        lr: peak learning rate, reached at the end of warmup.
        min_lr_ratio: the schedule decays to min_lr_ratio * lr.
        weight_decay: AdamW's decoupled weight decay on the matrices.
        beta1: AdamW's first-moment decay.
        beta2: AdamW's second-moment decay.
        eps: AdamW's epsilon.
        schedule: cosine (decay to the floor over the run), wsd (warmup-stable-decay, Hu et al. 2024: constant,
            then a linear decay over the last decay_fraction of steps), constant.
        warmup_steps: linear warmup from lr / warmup_steps to lr.
        total_steps: steps of the whole schedule; null = trainer.max_steps of the run's first start (a resume keeps
            the length it was started with; set this to change it).
        decay_fraction: wsd only: the share of steps that decays.
        decay_norms: weight decay on norm weights too.
        decay_biases: weight decay on biases too.
        decay_embeddings: weight decay on embeddings too.
        fused: torch's fused AdamW kernel; null = on where parameters live on CUDA.
    """

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: ScheduleName = "cosine"
    warmup_steps: int = 100
    total_steps: Optional[int] = None
    decay_fraction: float = 0.2
    # By default norms, biases and embeddings get no weight decay (they are not matrices that scale outputs).
    decay_norms: bool = False
    decay_biases: bool = False
    decay_embeddings: bool = False
    fused: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim config: schedule={self.schedule!r} is invalid: choose one of {', '.join(SCHEDULES)}")
        for field in ("lr", "eps"):
            if not getattr(self, field) > 0:
                raise ValueError(f"optim config: {field}={getattr(self, field)!r} is invalid: must be > 0")
        for field in ("min_lr_ratio", "decay_fraction", "beta1", "beta2"):
            value = getattr(self, field)
            if not 0 <= value <= 1:
                raise ValueError(f"optim config: {field}={value!r} is invalid: must be in [0, 1]")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("optim config: weight_decay and warmup_steps must be >= 0, "
                             f"got weight_decay={self.weight_decay!r}, warmup_steps={self.warmup_steps!r}")
        if self.total_steps is not None and self.total_steps <= self.warmup_steps:
            raise ValueError(f"optim config: total_steps={self.total_steps} must exceed warmup_steps={self.warmup_steps}")


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def _is_norm(module: nn.Module) -> bool:
    # Matches torch's LayerNorm/RMSNorm and our own norm classes by name, without importing the model package.
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "Norm" in type(module).__name__


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Split parameters into a decayed and an undecayed group; each tensor lands in exactly one."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue  # tied weights appear twice
            seen.add(id(param))
            if _is_norm(module):
                wants_decay = config.decay_norms
            elif name == "bias":
                wants_decay = config.decay_biases
            elif _is_embedding(module):
                wants_decay = config.decay_embeddings
            else:  # matrices; under ZeRO-3 a partitioned parameter is an empty 1-d tensor, ds_shape its real shape
                wants_decay = len(getattr(param, "ds_shape", param.shape)) >= 2
            (decay if wants_decay else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, config)
    fused = config.fused
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             fused=fused)


class Schedule:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then the configured shape.

    A callable object holding only plain values, not a closure: torch's LambdaLR saves such an object's attributes
    in its state_dict, so a checkpoint records the schedule's length (and shape) and a resume gets them back.
    """

    def __init__(self, config: OptimConfig, total_steps: int) -> None:
        self.schedule = config.schedule
        self.warmup_steps = config.warmup_steps
        self.min_lr_ratio = config.min_lr_ratio
        self.decay_fraction = config.decay_fraction
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        warmup, floor, total = self.warmup_steps, self.min_lr_ratio, self.total_steps
        if step < warmup:
            return (step + 1) / warmup
        if self.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.schedule == "wsd":
            decay_start = total - int(self.decay_fraction * total)
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
            return 1.0 - (1 - floor) * progress
        return 1.0  # constant


def lr_lambda(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    return Schedule(config, total_steps)


class ScheduleLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over a Schedule that, on resume, keeps the length the run was started with.

    Without this a resume with a larger trainer.max_steps re-stretches the cosine from the current step on, and the
    LR jumps (measured 3.00e-4 -> 3.31e-4 at the resume). The checkpoint's length wins unless `total_steps` was set
    explicitly (model.optim.total_steps) to another value: then the schedule changes, and says so.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> None:
        self.explicit_total = config.total_steps  # None: the length came from trainer.max_steps
        self.resume_note: Optional[str] = None
        super().__init__(optimizer, Schedule(config, total_steps))

    def load_state_dict(self, state_dict: dict) -> None:
        schedule: Schedule = self.lr_lambdas[0]
        asked, explicit = schedule.total_steps, self.explicit_total
        # Restores the saved Schedule's attributes (total_steps among them), and every attribute of this object the
        # checkpoint holds: explicit_total is this run's, taken before.
        super().load_state_dict(state_dict)
        self.explicit_total, saved = explicit, schedule.total_steps
        if saved == asked:
            return
        if explicit is not None:
            for each in self.lr_lambdas:
                each.total_steps = asked
            self.resume_note = (f"LR schedule: length changed from the checkpoint's {saved} steps to {asked} "
                                "(model.optim.total_steps)")
        else:
            self.resume_note = (f"LR schedule: keeping the checkpoint's length of {saved} steps (trainer.max_steps "
                                f"is now {asked}; set model.optim.total_steps to change the schedule)")
        if not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):  # once per run
            print(self.resume_note, file=sys.stderr)
