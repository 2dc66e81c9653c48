"""Loss-spike detection and response: SpikeDetector (method and strategy notes in docs/stability.md).

Every optimizer step, before the update, the detector scores the step's loss (mean over micro-batches and
ranks) and global gradient norm (before clipping) against exponential moving statistics of earlier steps:

    z = (x - mean) / max(std, min_rel_std · |mean|),     score = max(z_loss, z_grad_norm)

A step is a spike when score > threshold after `warmup_steps` steps, and always when the loss or the norm is
NaN/inf. A non-finite step never updates the weights, whatever the action (it would make every later step, and every
checkpoint, NaN), and more than `max_nonfinite_steps` of them in a row stop the run (TrainingDiverged). Each value enters the statistics clipped at mean + threshold · std, so one spike barely moves them while
a lasting change of level is absorbed within a few steps; a NaN never enters.

Actions (`action`):
  log        record the spike (stability/spike/events = 1 at its step, and a warning) and train on; a non-finite
             step is skipped as under skip_step.
  skip_step  as log, and the optimizer step of that batch does not happen: no moment update, no weight decay,
             no Adam step count (the LR schedule and the step counter still advance).
  rollback   as skip_step, then restore model, optimizer, LR schedule and global step from the newest
             checkpoint taken at or before the spike's step, and train on from the data after the spike: the
             batches between that checkpoint and the spike are not trained on again. After `max_rollbacks`
             rollbacks the next spike stops the run (TrainingDiverged).
skip_step (and rollback without a checkpoint yet) stops the run when more than `max_consecutive_spikes` steps in a
row are spikes: the run is not recovering.

Decisions never read the device in the hot path. The skip is taken on the device: the flag goes to the
optimizer as `found_inf`, the protocol torch's fused Adam/AdamW (and SGD) share with GradScaler, so the fused
kernel leaves parameters, moments and step counts untouched when it is 1. An optimizer without that support
(foreach/for-loop AdamW, e.g. on CPU) or a run with a GradScaler (16-mixed) reads the flag on the host instead
(one sync per step) and drops the gradients (p.grad = None), which torch optimizers skip. The host learns of a
decision one step later (log, skip_step), when it has long been computed; rollback reads it at the end of its
own step, waiting for the backward pass but not for the optimizer step queued behind it, so that no checkpoint
is written after a spike it has not seen.

DDP: the loss is all-reduced (mean; no barrier before it, unlike Lightning's strategy.reduce) and the gradients
are already, so every rank computes the same score and takes the same decision. DeepSpeed: gradients are
partitioned, so the decision is taken inside DeepSpeed's step, in a step pre-hook of the wrapped torch optimizer,
from the global norm DeepSpeed has just computed (`_global_grad_norm`; it reports a NaN/inf norm as -1); the skip
then works as above on that optimizer.
Rollback restores through the strategy (Lightning's loaders, or DeepSpeed's engine for ZeRO folders).

SpikeDetector must come after the monitors in the callback list (checked at setup): a rollback at the end of a
batch restores weights that a monitor reading the step's update afterwards would take for that update.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from llmtrain.callbacks.stability import PREFIX, AttentionMonitor, LogitMonitor, WeightMonitor, is_deepspeed
from llmtrain.compat import (deepspeed_global_grad_norm, rewind_optimizer_steps, set_found_inf,
                             takes_step_tensors, torch_optimizer)
from llmtrain.training.agreement import HostCopy, mean_over_ranks
from llmtrain.training.step_log import log_step

ACTIONS = ("log", "skip_step", "rollback")
CHECKPOINT_STEP = re.compile(r"step=?(\d+)")  # PeriodicCheckpoint's step0000100.ckpt, Lightning's ...-step=100.ckpt


class TrainingDiverged(RuntimeError):
    """Raised by SpikeDetector when its bounds on rollbacks or consecutive spikes are exhausted."""


class SpikeStatistics:
    """Exponential moving mean and variance of a few series (loss, grad norm) and the spike test, on the device.

    update(x) scores x against the statistics of the earlier values, then folds x in:
    d = x - mean; mean += (1 - beta)·d; var = beta·(var + (1 - beta)·d²) (the exponentially weighted variance).
    """

    def __init__(self, n_series: int, ema_beta: float, warmup_steps: int, threshold: float, min_rel_std: float,
                 device: torch.device) -> None:
        self.beta, self.warmup_steps, self.threshold, self.min_rel_std = ema_beta, warmup_steps, threshold, min_rel_std
        self.mean = torch.zeros(n_series, device=device)
        self.var = torch.zeros(n_series, device=device)
        self.count = torch.zeros((), device=device)  # values folded in so far

    def update(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (n_series,) -> (score, spike): 0-dim float and bool tensors; no host sync."""
        finite = torch.isfinite(x).all()
        std = torch.maximum(self.var.sqrt(), self.min_rel_std * self.mean.abs()).clamp_min(1e-12)
        warm = self.count >= self.warmup_steps
        z = ((x - self.mean) / std).amax()
        score = torch.where(finite, torch.where(warm, z, torch.zeros_like(z)), torch.full_like(z, math.inf))
        spike = (score > self.threshold) | ~finite
        clipped = torch.where(warm, torch.minimum(x, self.mean + self.threshold * std), x)
        first = self.count == 0
        d = clipped - self.mean
        mean = torch.where(first, clipped, self.mean + (1 - self.beta) * d)
        var = torch.where(first, torch.zeros_like(d), self.beta * (self.var + (1 - self.beta) * d.square()))
        self.mean = torch.where(finite, mean, self.mean)
        self.var = torch.where(finite, var, self.var)
        self.count = self.count + finite.float()
        return score, spike

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean.cpu(), "var": self.var.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.mean.device
        self.mean, self.var, self.count = (state[k].to(device) for k in ("mean", "var", "count"))


@dataclass
class _Decision:
    """One step's decision on its way to the host: values = (loss, grad_norm, score, spike) on the device."""

    step: int  # logging step
    global_step: int  # optimizer steps done before this one: checkpoints named <= this are from before it
    values: HostCopy  # behind the decision's kernels: read later without waiting for later work
    fresh: bool = True  # made during the current batch

    def read(self) -> tuple[float, float, float, bool]:
        loss, grad_norm, score, spike = self.values.get().tolist()
        return loss, grad_norm, score, bool(spike)


class SpikeDetector(pl.Callback):
    """Detects loss / gradient-norm spikes and NaN/inf every step and responds with `action` (module docstring).

    Logs stability/spike/score every step and stability/spike/events = 1 at each spike; `events` lists them.
    """

    def __init__(
        self,
        action: str = "log",
        threshold: float = 6.0,
        ema_beta: float = 0.99,
        warmup_steps: int = 50,
        min_rel_std: float = 0.01,
        use_grad_norm: bool = True,
        max_rollbacks: int = 3,
        max_consecutive_spikes: int = 20,
        max_nonfinite_steps: int = 3,
    ) -> None:
        """
        Args:
            action: "log", "skip_step" or "rollback".
            threshold: z-score above which a step is a spike.
            ema_beta: decay of the moving statistics (0.99: about the last 100 steps).
            warmup_steps: steps folded into the statistics before any step is scored (NaN/inf always count).
            min_rel_std: floor of the std relative to the mean, so a very quiet series does not make noise a spike.
            use_grad_norm: score the global gradient norm besides the loss.
            max_rollbacks: rollbacks allowed in the run; the next spike after them stops it.
            max_consecutive_spikes: skip_step stops the run when more than this many steps in a row are spikes.
            max_nonfinite_steps: every action stops the run when more than this many steps in a row have a NaN/inf
                loss or gradient norm (each of them skipped): the run is not recovering by itself.
        """
        if action not in ACTIONS:
            raise ValueError(f"SpikeDetector: action={action!r} is invalid: choose one of {', '.join(ACTIONS)}")
        if not threshold > 0 or not 0 < ema_beta < 1 or min_rel_std < 0:
            raise ValueError(f"SpikeDetector: need threshold > 0 (got {threshold}), 0 < ema_beta < 1 (got {ema_beta}) "
                             f"and min_rel_std >= 0 (got {min_rel_std})")
        for name, value in (("warmup_steps", warmup_steps), ("max_rollbacks", max_rollbacks),
                            ("max_consecutive_spikes", max_consecutive_spikes),
                            ("max_nonfinite_steps", max_nonfinite_steps)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SpikeDetector: {name}={value!r} is invalid: must be an int >= 0")
        self.action, self.threshold, self.ema_beta, self.warmup_steps = action, threshold, ema_beta, warmup_steps
        self.min_rel_std, self.use_grad_norm = min_rel_std, use_grad_norm
        self.max_rollbacks, self.max_consecutive_spikes = max_rollbacks, max_consecutive_spikes
        self.max_nonfinite_steps = max_nonfinite_steps
        self.stats: Optional[SpikeStatistics] = None
        self._loaded_stats: Optional[dict[str, Tensor]] = None
        self.rollbacks = 0
        self.consecutive = 0
        self.nonfinite_in_row = 0
        self.events: list[dict[str, Any]] = []  # this process's spikes: step, loss, grad_norm, score, response
        self._loss: Optional[Tensor] = None  # summed over the micro-batches of the step
        self._deepspeed_loss: Optional[tuple[pl.Trainer, Tensor]] = None
        self._flag: Optional[Tensor] = None
        self._flag_host: Optional[bool] = None
        self._pending: list[_Decision] = []
        self._hook: Any = None
        self._stop: Optional[str] = None
        self._trainer: Optional[pl.Trainer] = None

    # -- setup ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("SpikeDetector needs automatic optimization")
        if self.action == "rollback" and trainer.checkpoint_callback is None:
            raise ValueError("SpikeDetector(action='rollback') needs a checkpoint callback to roll back to "
                             "(llmtrain.callbacks.PeriodicCheckpoint)")
        if is_deepspeed(trainer):  # the decision needs DeepSpeed's gradient norm, known only inside its step
            self._hook = torch_optimizer(trainer.optimizers[0]).register_step_pre_hook(self._deepspeed_pre_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._process(trainer, self._pending)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _statistics(self, device: torch.device) -> SpikeStatistics:
        if self.stats is None:
            self.stats = SpikeStatistics(2, self.ema_beta, self.warmup_steps, self.threshold, self.min_rel_std, device)
            if self._loaded_stats is not None:
                self.stats.load_state_dict(self._loaded_stats)
        return self.stats

    # -- the decision, before the update ----------------------------------------------------------------------
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # Lightning divides each micro-batch's loss by accumulate_grad_batches: the sum is the step's mean.
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._loss is None:
            return
        loss = mean_over_ranks(trainer, self._loss)  # the same value on every rank
        self._loss = None
        if is_deepspeed(trainer):
            self._deepspeed_loss = (trainer, loss)
            return
        grad_norm = self._gradient_norm(pl_module) if self.use_grad_norm else None
        self._decide(trainer, loss, grad_norm)
        self._skip(trainer, torch_optimizer(optimizer))

    @staticmethod
    def _gradient_norm(pl_module: pl.LightningModule) -> Optional[Tensor]:
        shared = getattr(pl_module, "gradient_norm", None)  # LanguageModel's: the pass its clipping reuses
        if shared is not None:
            return shared()
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None

    def _deepspeed_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Runs once per parameter group (ZeRO-1/2) or sub-group (ZeRO-3); decide on the first call of the step.
        if self._deepspeed_loss is not None:
            trainer, loss = self._deepspeed_loss
            self._deepspeed_loss = None
            norm = deepspeed_global_grad_norm(trainer.optimizers[0]) if self.use_grad_norm else None
            if norm is not None:
                norm = torch.as_tensor(norm, dtype=torch.float32, device=loss.device)
                norm = torch.where(norm < 0, torch.full_like(norm, math.inf), norm)
            self._decide(trainer, loss, norm)
        self._skip(trainer=None, optimizer=optimizer)

    def _decide(self, trainer: pl.Trainer, loss: Tensor, grad_norm: Optional[Tensor]) -> None:
        # Without a gradient norm the second series is a constant 0: it never scores.
        grad_norm = torch.zeros_like(loss) if grad_norm is None else grad_norm.float().to(loss.device)
        score, spike = self._statistics(loss.device).update(torch.stack([loss, grad_norm]))
        # What _skip drops: every spike under skip_step/rollback, a non-finite step under any action (score is inf
        # exactly when the loss or the norm is not finite).
        self._flag = spike if self.action != "log" else ~torch.isfinite(score)
        self._flag_host = None
        values = torch.stack([loss, grad_norm, score, spike.float()])
        self._pending.append(_Decision(log_step(trainer), trainer.global_step, HostCopy(values)))

    def _skip(self, trainer: Optional[pl.Trainer], optimizer: torch.optim.Optimizer) -> None:
        """Makes this step's update a no-op when the flag of _decide is set."""
        if self._flag is None:
            return
        if takes_step_tensors(optimizer, trainer):
            set_found_inf(optimizer, self._flag.float())  # read by the fused kernel: no host sync
            return
        if self._flag_host is None:
            self._flag_host = bool(self._flag)  # host sync: this optimizer cannot take the flag on the device
        if self._flag_host:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # torch optimizers skip parameters without gradient entirely

    # -- the response, on the host ----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ready = self._pending if self.action == "rollback" else [d for d in self._pending if not d.fresh]
        self._process(trainer, ready)
        for decision in self._pending:
            decision.fresh = False
        set_found_inf(torch_optimizer(trainer.optimizers[0]), None)  # the flag is for one step only
        self._flag = self._flag_host = None
        if self._stop is not None:
            raise TrainingDiverged(self._stop)

    def _process(self, trainer: pl.Trainer, decisions: list[_Decision]) -> None:
        """Logs and answers decisions on the host; a stop is raised at the next batch end (not mid-checkpoint)."""
        for decision in list(decisions):
            self._pending.remove(decision)
            loss, grad_norm, score, spike = decision.read()
            metrics = {f"{PREFIX}/spike/score": score}
            if spike:
                metrics[f"{PREFIX}/spike/events"] = 1.0
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=decision.step)
            if not spike:
                self.consecutive = self.nonfinite_in_row = 0
                continue
            self.consecutive += 1
            finite = math.isfinite(score)
            self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
            response = "skip_step" if self.action == "log" and not finite else self.action
            event = {"step": decision.step, "global_step": decision.global_step, "loss": loss,
                     "grad_norm": grad_norm, "score": score, "response": response}
            self.events.append(event)
            what = f"loss={loss:.4g}, grad_norm={grad_norm:.4g}, score={score:.3g} (threshold {self.threshold})"
            rank_zero_warn(f"SpikeDetector: spike at step {decision.step}: {what}; action: {response}")
            if self.nonfinite_in_row > self.max_nonfinite_steps:
                self._stop = (f"SpikeDetector: {self.nonfinite_in_row} steps in a row with a non-finite loss or "
                              f"gradient norm (max_nonfinite_steps={self.max_nonfinite_steps}), the last at step "
                              f"{decision.step}: {what}. None of them updated the weights; the newest checkpoint "
                              "holds the last finite ones. Lower the learning rate, enable qk_norm / z-loss, or check "
                              "the data, then resume with --ckpt_path last.")
            elif self.action == "rollback":
                self._respond_with_rollback(trainer, decision, event, what)
            elif self.action == "skip_step" and self.consecutive > self.max_consecutive_spikes:
                self._stop = (f"SpikeDetector: {self.consecutive} spikes in a row (max_consecutive_spikes="
                              f"{self.max_consecutive_spikes}), the last at step {decision.step}: {what}. "
                              "The run is diverging: lower the learning rate, or enable qk_norm / z-loss.")

    def _respond_with_rollback(self, trainer: pl.Trainer, decision: _Decision, event: dict, what: str) -> None:
        if self.rollbacks >= self.max_rollbacks:
            self._stop = (f"SpikeDetector: spike at step {decision.step} ({what}) after {self.rollbacks} rollbacks "
                          f"(max_rollbacks={self.max_rollbacks}): stopping. Lower the learning rate, enable "
                          "qk_norm / z-loss, or allow more rollbacks.")
            return
        path = self._checkpoint_at_or_before(trainer, decision.global_step)
        if path is None:
            event["response"] = "skip_step"
            rank_zero_warn(f"SpikeDetector: no checkpoint at or before step {decision.global_step} to roll back to; "
                           "the step was skipped instead")
            if self.consecutive > self.max_consecutive_spikes:
                self._stop = (f"SpikeDetector: {self.consecutive} spikes in a row before any checkpoint "
                              f"(max_consecutive_spikes={self.max_consecutive_spikes}): stopping.")
            return
        restored = restore_checkpoint(trainer, path)
        self.rollbacks += 1
        self.consecutive = 0
        event["rolled_back_to"] = restored
        rank_zero_warn(f"SpikeDetector: rolled back to {path} (step {restored}), rollback {self.rollbacks} of "
                       f"{self.max_rollbacks}; training goes on from the batch after the spike")

    @staticmethod
    def _checkpoint_at_or_before(trainer: pl.Trainer, global_step: int) -> Optional[str]:
        best: Optional[tuple[int, str]] = None
        if trainer.is_global_zero:
            folder = Path(trainer.checkpoint_callback.dirpath)
            for path in folder.glob("*.ckpt") if folder.is_dir() else []:
                match = CHECKPOINT_STEP.search(path.name)
                if path.name.startswith((".", "last")) or match is None or int(match[1]) > global_step:
                    continue
                if best is None or int(match[1]) > best[0]:
                    best = (int(match[1]), str(path))
        return trainer.strategy.broadcast(None if best is None else best[1])

    # -- checkpointed state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._pending and self._trainer is not None:  # log what is in flight (a sync at checkpoint time only)
            self._process(self._trainer, list(self._pending))
        state: dict[str, Any] = {"rollbacks": self.rollbacks, "consecutive": self.consecutive,
                                 "nonfinite_in_row": self.nonfinite_in_row}
        if self.stats is not None:
            state["stats"] = self.stats.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollbacks = state_dict.get("rollbacks", 0)
        self.consecutive = state_dict.get("consecutive", 0)
        self.nonfinite_in_row = state_dict.get("nonfinite_in_row", 0)
        self._loaded_stats = state_dict.get("stats")
        self.stats = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict() gets no trainer but may have decisions to log
        check_after_monitors(self, trainer.callbacks)


def check_after_monitors(detector: SpikeDetector, callbacks: list[pl.Callback]) -> None:
    """Refuses a callback list with a stability monitor after the detector (see the module docstring: the monitor
    would read a rolled-back update as the step's), naming the order to use."""
    position = next(i for i, callback in enumerate(callbacks) if callback is detector)
    late = [type(c).__name__ for c in callbacks[position + 1:] if isinstance(c, (LogitMonitor, AttentionMonitor, WeightMonitor))]
    if late:
        raise ValueError(f"trainer.callbacks: SpikeDetector comes before {', '.join(late)}; put it after the "
                         "stability monitors (a rollback at a batch end would otherwise be read by them as that "
                         "step's update)")


def restore_checkpoint(trainer: pl.Trainer, path: str) -> int:
    """Loads model, optimizer, LR schedulers and global step of a checkpoint into the running fit; returns its
    global step. Lightning's logging step and the data stream are left to run on (see the module docstring)."""
    checkpoint = trainer.strategy.load_checkpoint(path, weights_only=True)  # DeepSpeed: loads its engine here
    trainer.strategy.load_model_state_dict(checkpoint, strict=True)
    trainer.strategy.load_optimizer_state_dict(checkpoint)
    for config, state in zip(trainer.lr_scheduler_configs, checkpoint["lr_schedulers"]):
        config.scheduler.load_state_dict(state)
    precision_key = type(trainer.precision_plugin).__qualname__
    if precision_key in checkpoint:  # e.g. GradScaler state under 16-mixed
        trainer.precision_plugin.load_state_dict(checkpoint[precision_key])
    step = int(checkpoint["global_step"])
    rewind_optimizer_steps(trainer, step)
    return step
