"""AdamW parameter groups and learning-rate schedules (linear warmup + cosine, warmup-stable-decay)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class OptimConfig:
    """AdamW and its schedule. Defaults follow common small-LM practice (GPT-3/Llama: betas 0.9/0.95, wd 0.1)."""

    lr: float = 3e-4
    # The schedule decays to min_lr_ratio * lr.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 100
    # Steps of the whole schedule; None = trainer.max_steps.
    total_steps: Optional[int] = None
    # warmup-stable-decay (Hu et al. 2024, MiniCPM): the last `decay_fraction` of steps decay linearly to min_lr.
    decay_fraction: float = 0.2
    # By default norms, biases and embeddings get no weight decay (they are not matrices that scale outputs).
    decay_norms: bool = False
    decay_biases: bool = False
    decay_embeddings: bool = False
    # torch's fused AdamW kernel; None = on where parameters live on CUDA.
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


def lr_lambda(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    warmup, floor = config.warmup_steps, config.min_lr_ratio

    def warmup_factor(step: int) -> Optional[float]:
        return (step + 1) / warmup if step < warmup else None

    def cosine(step: int) -> float:
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def wsd(step: int) -> float:
        decay_start = total_steps - int(config.decay_fraction * total_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1 - floor) * progress

    shape = {"cosine": cosine, "wsd": wsd, "constant": lambda step: 1.0}[config.schedule]

    def factor(step: int) -> float:
        w = warmup_factor(step)
        return w if w is not None else shape(step)

    return factor
