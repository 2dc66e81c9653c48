"""llmtrain.compat: every private touchpoint still exists and behaves as llmtrain relies on."""

from __future__ import annotations


# ---------------------------------------------------------------------- Lightning's loop state, TensorBoard writer

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: E402

from llmtrain import compat  # noqa: E402


class _LoopStateProbe(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.seen.append((compat.batches_that_stepped(trainer), compat.should_accumulate(trainer)))


def test_loop_state_counts_optimizer_steps_and_knows_accumulation(tmp_path) -> None:
    probe = _LoopStateProbe()
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[probe], default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    # Six micro-batches: steps 0,0,1,1,2,2 before each; every second one ends an optimizer step.
    assert probe.seen == [(0, True), (0, False), (1, True), (1, False), (2, True), (2, False)], \
        f"lightning {pl.__version__}: _batches_that_stepped / _should_accumulate changed"


def test_tensorboard_prefix_and_file_writer_write_one_event(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="", prefix="pre")
    assert compat.tensorboard_prefix(logger) == "pre"
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in (("a", 1.0), ("b", 2.0))])
    compat.tensorboard_file_writer(logger.experiment).add_summary(summary, 7)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path)).Reload()
    assert {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in ("a", "b")} == \
        {"a": [(7, 1.0)], "b": [(7, 2.0)]}, f"torch {torch.__version__}: SummaryWriter._get_file_writer changed"


# ------------------------------------- the SIGTERM flag, DDP's wrapper arguments, ModelCheckpoint's save path, DeepSpeed

from types import SimpleNamespace  # noqa: E402

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402


class _SaveRecorder(pl.Callback):
    def __init__(self, checkpoint: ModelCheckpoint, save_at_end: bool) -> None:
        self.checkpoint, self.save_at_end, self.saved = checkpoint, save_at_end, []

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.saved.append(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_at_end:
            compat.save_checkpoint_now(self.checkpoint, trainer)
            compat.save_checkpoint_now(self.checkpoint, trainer)  # the same step again: no second write


def _fit_with(checkpoint: ModelCheckpoint, save_at_end: bool, tmp_path) -> _SaveRecorder:
    recorder = _SaveRecorder(checkpoint, save_at_end)
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoint, recorder], default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    return recorder


def test_take_over_sigterm_clears_the_flag_and_stops_the_per_step_broadcast() -> None:
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    loop = trainer.fit_loop.epoch_loop
    assert callable(getattr(type(loop), "_broadcast_sigterm_tensor", None)), \
        f"lightning {pl.__version__}: _TrainingEpochLoop._broadcast_sigterm_tensor is gone (drop the override?)"
    trainer._signal_connector.received_sigterm = True
    compat.take_over_sigterm(trainer)
    assert trainer.received_sigterm is False, f"lightning {pl.__version__}: Trainer.received_sigterm is kept elsewhere"
    assert loop._broadcast_sigterm_tensor() is None
    compat.restore_sigterm_broadcast(trainer)
    assert loop._broadcast_sigterm_tensor.__func__ is type(loop)._broadcast_sigterm_tensor


def test_ddp_wrapper_kwargs_are_the_ones_the_strategy_wraps_with() -> None:
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    kwargs = compat.ddp_wrapper_kwargs(DDPStrategy(bucket_cap_mb=10))
    assert kwargs == {"bucket_cap_mb": 10}, f"lightning {pl.__version__}: DDPStrategy._ddp_kwargs changed"
    assert compat.ddp_wrapper_kwargs(SingleDeviceStrategy("cpu")) is None
    assert compat.ddp_wrapper_kwargs(DeepSpeedStrategy.__new__(DeepSpeedStrategy)) is None


def test_save_checkpoint_now_saves_the_current_step_once_and_moves_last(tmp_path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=2,
                                 monitor="step", mode="max", save_last="link")
    recorder = _fit_with(checkpoint, True, tmp_path)
    assert recorder.saved == [2, 3], f"lightning {pl.__version__}: ModelCheckpoint's save path changed"
    assert (tmp_path / "last.ckpt").resolve().name == "step=3.ckpt"


def test_deepspeed_loads_universal_sets_what_the_engine_reads() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    engine = SimpleNamespace(_config=DeepSpeedConfig({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1}))
    assert DeepSpeedEngine.load_universal_checkpoint(engine) is False
    with compat.deepspeed_loads_universal(engine, True):
        assert DeepSpeedEngine.load_universal_checkpoint(engine) is True, "DeepSpeed's engine reads another flag"
    assert DeepSpeedEngine.load_universal_checkpoint(engine) is False


# ------------------------------------------------ Lightning's signal connector and step counter (preemption, rollback)

import signal  # noqa: E402


class _InstallsAtSetupThenFails(pl.Callback):
    """Installs a SIGUSR2 handler before the Trainer registers its own (as PreemptionCheckpoint does), asks for the
    one found before to be put back, then fails mid-fit: the path where only the Trainer's teardown restores."""

    def __init__(self) -> None:
        self.before = signal.getsignal(signal.SIGUSR2)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        signal.signal(signal.SIGUSR2, lambda signum, frame: None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        compat.set_handlers_restored_after_fit(trainer, {signal.SIGUSR2: self.before})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        raise RuntimeError("planted")


def test_handlers_restored_after_a_failed_fit_are_the_ones_asked_for(tmp_path) -> None:
    probe = _InstallsAtSetupThenFails()
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
                         default_root_dir=tmp_path)
    try:
        trainer.fit(BoringModel())
    except RuntimeError:
        pass
    assert signal.getsignal(signal.SIGUSR2) is probe.before, \
        f"lightning {pl.__version__}: Trainer._signal_connector._original_handlers changed"


class _RewindsOnce(pl.Callback):
    def __init__(self) -> None:
        self.after_rewind: list[int] = []
        self.batches = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if trainer.global_step == 3 and not self.after_rewind:
            compat.rewind_optimizer_steps(trainer, 1)
            self.after_rewind.append(trainer.global_step)


def test_rewind_optimizer_steps_moves_global_step_back_and_the_data_on(tmp_path) -> None:
    probe = _RewindsOnce()
    trainer = pl.Trainer(max_steps=5, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
                         default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    # 3 steps, back to 1, 4 more steps to reach 5: 7 batches, none of them seen twice.
    assert (probe.after_rewind, trainer.global_step, probe.batches) == ([1], 5, 7), \
        f"lightning {pl.__version__}: optim_progress.optimizer.step changed"


# ------------------------------------------------------------------- torch's found_inf skip, DeepSpeed's norm

@torch.no_grad()
def _fused_adamw_step(found_inf: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    weight.grad = torch.full((4,), 0.5)
    assert compat.takes_found_inf(optimizer), f"torch {torch.__version__}: _step_supports_amp_scaling is gone"
    compat.set_found_inf(optimizer, torch.tensor(found_inf))
    optimizer.step()
    compat.set_found_inf(optimizer, None)
    assert not hasattr(optimizer, "found_inf")
    return weight.detach().clone(), torch.ones(4), optimizer.state[weight]


def test_found_inf_skips_the_fused_step_entirely_and_only_when_set() -> None:
    skipped, start, state = _fused_adamw_step(1.0)
    assert torch.equal(skipped, start) and float(state["step"]) == 0 and not state["exp_avg"].any(), \
        f"torch {torch.__version__}: fused AdamW no longer honours found_inf"
    taken, start, state = _fused_adamw_step(0.0)
    assert not torch.equal(taken, start) and float(state["step"]) == 1
    assert not compat.takes_found_inf(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], foreach=True))


# One ZeRO-2 step on CPU; a step pre-hook of the wrapped torch optimizer reads the norm DeepSpeed has just computed,
# which must equal the norm of the same gradients computed by plain torch.
GRAD_NORM_SCRIPT = r"""
import torch, deepspeed
from llmtrain import compat
torch.manual_seed(0)
model, reference = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
reference.load_state_dict(model.state_dict())
x = torch.randn(2, 8)
reference(x).square().sum().backward()
expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
seen = []
engine.optimizer.optimizer.register_step_pre_hook(
    lambda opt, args, kwargs: seen.append(float(compat.deepspeed_global_grad_norm(engine.optimizer))))
engine.backward(engine(x).square().sum())
engine.step()
print("NORMS", seen[0], expected)
"""


def test_deepspeed_global_grad_norm_is_known_before_the_update() -> None:
    from tests.conftest import run_deepspeed_ranks

    (output,) = run_deepspeed_ranks(GRAD_NORM_SCRIPT, [], world_size=1)
    seen, expected = map(float, output.split("NORMS")[1].split())
    import deepspeed

    assert abs(seen - expected) <= 1e-5 * expected, \
        f"deepspeed {deepspeed.__version__}: ZeRO's _global_grad_norm is {seen}, the gradients' norm is {expected}"


# ---------------------------------------------------------------------------- torch's semi-private entry points


def test_foreach_norm_is_each_tensors_l2_norm() -> None:
    tensors = [torch.tensor([3.0, 4.0]), torch.ones(4)]
    assert [float(n) for n in compat.foreach_norm(tensors)] == [5.0, 2.0], f"torch {torch.__version__}"


def test_compile_mode_options_name_cuda_graphs_for_reduce_overhead() -> None:
    assert compat.compile_mode_options("reduce-overhead").get("triton.cudagraphs") is True
    assert compat.compile_mode_options("default") == {}


def test_checkpoint_wrapper_keeps_parameter_names_and_trains() -> None:
    wrapped = compat.checkpoint_wrapper(torch.nn.Linear(2, 2))
    assert [name for name, _ in wrapped.named_parameters()] == ["weight", "bias"], f"torch {torch.__version__}"
    assert list(wrapped.state_dict()) == ["weight", "bias"]
    wrapped(torch.ones(1, 2, requires_grad=True)).sum().backward()
    assert wrapped._checkpoint_wrapped_module.weight.grad is not None


def test_parser_options_lists_long_options() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model.config.norm")
    assert "--model.config.norm" in compat.parser_options(parser)
