"""The few private attributes of Lightning, DeepSpeed and torch that llmtrain still needs, each behind one function.

Everything else uses public APIs. Each touchpoint here has a test in tests/test_compat.py that fails loudly (naming
the attribute and the library version) when an upgrade removes or changes it, so a version bump breaks one test
instead of a run.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter


# ------------------------------------------------------------------------- Lightning's loop state (step_log, module)


def batches_that_stepped(trainer: "pl.Trainer") -> int:
    """The step Lightning's own `self.log` writes at (`epoch_loop._batches_that_stepped`): optimizer steps taken so
    far, which keeps counting through a SpikeDetector rollback (global_step goes back), so a TensorBoard axis that
    uses it never runs backwards. No public counter has that property."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def should_accumulate(trainer: "pl.Trainer") -> bool:
    """Whether the current batch is inside gradient accumulation (not the step's last micro-batch), by Lightning's
    own rule (`fit_loop._should_accumulate()`), which also knows when the strategy accumulates itself (DeepSpeed)."""
    return trainer.fit_loop._should_accumulate()


# --------------------------------------------------------------------------------------- TensorBoard (step_log)


def tensorboard_prefix(logger: "TensorBoardLogger") -> str:
    """The `prefix` a TensorBoardLogger adds to every tag in log_metrics (stored only as `_prefix`)."""
    return logger._prefix


def tensorboard_file_writer(writer: "SummaryWriter") -> Any:
    """torch's SummaryWriter's event-file writer (`_get_file_writer()`), whose `add_summary` writes many scalars
    as one event: add_scalar builds an event per scalar (67 ms for 720 values against 1 ms, on 2 CPU cores)."""
    return writer._get_file_writer()


# ------------------------------------------------------------------------ ModelCheckpoint (PeriodicCheckpoint)


def save_checkpoint_now(callback: "ModelCheckpoint", trainer: "pl.Trainer") -> None:
    """A save of the current step through ModelCheckpoint's own path (top-k rotation, then `last`), unless this
    step was saved already (`_should_skip_saving_checkpoint`, `_save_topk_checkpoint`, `_save_last_checkpoint`)."""
    if callback._should_skip_saving_checkpoint(trainer):
        return
    candidates = callback._monitor_candidates(trainer)
    callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)


# --------------------------------------------------------------------------- Lightning's DDP wrapper (module)


def ddp_wrapper_kwargs(strategy: Any) -> Optional[dict[str, Any]]:
    """The keyword arguments a plain DDPStrategy hands to DistributedDataParallel when it wraps the model
    (`_ddp_kwargs`, read at the wrap): defaults added here before it count. None for any other strategy (DeepSpeed's
    subclasses DDPStrategy but wraps nothing in DDP)."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    if not isinstance(strategy, DDPStrategy) or isinstance(strategy, DeepSpeedStrategy):
        return None
    return strategy._ddp_kwargs


# ------------------------------------------------------------------------------ DeepSpeed's engine (ZeroStrategy)


@contextlib.contextmanager
def deepspeed_loads_universal(engine: Any, universal: bool) -> Iterator[None]:
    """For the loads inside the block, DeepSpeed's engine reads a universal checkpoint (`latest_universal`, whole
    per-parameter tensors that each rank cuts its partition from) or a plain ZeRO folder (`latest`, per-rank shards).
    The engine decides by its config (`engine._config.load_universal_checkpoint`, set once from the DeepSpeed config
    when the engine is built); `load_checkpoint` takes no such argument, and which kind `--ckpt_path` or a rollback
    names is known only at the load."""
    config = engine._config
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = universal
    try:
        yield
    finally:
        config.load_universal_checkpoint = previous


# --------------------------------------------------------------------- Lightning's signal connector (preemption)


def set_handlers_restored_after_fit(trainer: "pl.Trainer", handlers: dict[int, Any]) -> None:
    """Makes the Trainer's teardown put back `handlers` (signal number -> handler) instead of the ones it found when
    it registered its own (`trainer._signal_connector._original_handlers`). PreemptionCheckpoint installs its
    handlers before that registration, so the Trainer would otherwise re-install them after a fit that ends with an
    exception (the teardown hooks, which undo them, do not run then), leaving later signals swallowed."""
    trainer._signal_connector._original_handlers.update(handlers)


def take_over_sigterm(trainer: "pl.Trainer") -> None:
    """For a callback that replaced the Trainer's SIGTERM handler and stops at step boundaries itself: clears the
    Trainer's flag (set by a SIGTERM before training started, on which Lightning's loops would stop this rank alone)
    and turns off the loop's per-step broadcast of it (`_TrainingEpochLoop._broadcast_sigterm_tensor`, under
    torch.distributed: a collective read on the host at every batch start, which drains the GPU's queue). With the
    handler replaced the flag stays False, so that broadcast would only ever carry 0."""
    trainer._signal_connector.received_sigterm = False
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = lambda: None


def restore_sigterm_broadcast(trainer: "pl.Trainer") -> None:
    """Undoes take_over_sigterm's instance override (a later fit of this Trainer may run without the callback)."""
    vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)


# ------------------------------------------------------------------ Lightning's optimizer-step counter (rollback)


def rewind_optimizer_steps(trainer: "pl.Trainer", global_step: int) -> None:
    """Sets the optimizer-step progress that `trainer.global_step` reads (`fit_loop.epoch_loop.automatic_optimization
    .optim_progress.optimizer.step`, total and current) back to `global_step`, as a rollback to a checkpoint of that
    step needs, without touching the batch progress (the data stream runs on). Lightning only restores it through
    `fit_loop.load_state_dict`, which would also rewind the data position."""
    progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
    back = progress.total.completed - global_step
    for tracker in (progress.total, progress.current):
        tracker.ready = max(0, tracker.ready - back)
        tracker.completed = max(0, tracker.completed - back)


# ---------------------------------------------------------------------- DeepSpeed's global norm (SpikeDetector)


def deepspeed_global_grad_norm(optimizer: Any) -> Optional[Any]:
    """The global gradient norm (before clipping) a DeepSpeed ZeRO optimizer has just computed in its step
    (`_global_grad_norm`; a NaN/inf norm reads -1), or None when it has none. The engine's public
    `get_global_grad_norm()` copies it only after the optimizer step, too late for a decision before the update."""
    return getattr(optimizer, "_global_grad_norm", None)


# --------------------------------------------------------------- torch's found_inf step skip (SpikeDetector)


def takes_found_inf(optimizer: Any) -> bool:
    """Whether `optimizer.step()` reads a `found_inf` tensor and skips the whole update on the device when it is 1,
    and a `grad_scale` tensor it divides every gradient by inside its kernel (`_step_supports_amp_scaling`: torch's
    fused Adam/AdamW/SGD, the protocol they share with GradScaler)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def takes_step_tensors(optimizer: Any, trainer: Optional[pl.Trainer]) -> bool:
    """Whether this step's `found_inf` / `grad_scale` may be handed to `optimizer.step()`: it reads them
    (takes_found_inf), and no GradScaler (16-mixed) sets its own for the same step. `trainer` None: none known."""
    scaler = trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None
    return takes_found_inf(optimizer) and not scaler


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's and DeepSpeed's wrappers."""
    import torch

    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer")
    return optimizer


def set_grad_scale(optimizer: Any, scale: Optional[Any]) -> None:
    """Gives the next `optimizer.step()` a divisor for every gradient (a 0-dim float tensor on the parameters'
    device), or removes it (None). Only where takes_step_tensors()."""
    if scale is None:
        if hasattr(optimizer, "grad_scale"):
            del optimizer.grad_scale
    else:
        optimizer.grad_scale = scale


def set_found_inf(optimizer: Any, flag: Optional[Any]) -> None:
    """Gives the next `optimizer.step()` a skip flag (a 0-dim float tensor on the parameters' device: 1 skips), or
    removes it (None), so that it applies to one step only. Only where takes_step_tensors()."""
    if flag is None:
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
    else:
        optimizer.found_inf = flag


# ---------------------------------------------------------------------------- torch's semi-private entry points


def foreach_norm(tensors: list[Any]) -> list[Any]:
    """The L2 norm of each tensor in one multi-tensor kernel launch (`torch._foreach_norm`; the public
    get_total_norm returns only their combined norm)."""
    import torch

    return torch._foreach_norm(tensors)


def compile_mode_options(mode: str) -> dict[str, Any]:
    """The inductor options a torch.compile mode stands for (`torch._inductor.list_mode_options`): torch.compile
    takes a mode or options, not both."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def checkpoint_wrapper(module: Any) -> Any:
    """torch's activation-checkpointing module wrapper (`torch.distributed.algorithms._checkpoint`), the one FSDP and
    torchtitan use; it keeps the wrapped module's parameter and state-dict names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrap

    return wrap(module)


# ----------------------------------------------------------------------------------------- argparse (cli)


def parser_options(parser: Any) -> list[str]:
    """Every long option a (jsonargparse or argparse) parser knows, from argparse's own `_actions` list."""
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
