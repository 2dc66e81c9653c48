from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from llmtrain.model import ConfigError, ModelConfig
from llmtrain.training.module import LanguageModel, check_compatible
from llmtrain.training.optim import OptimConfig
from tests.callbacks import CaptureLogger, fit, random_batches, tiny_config

TINY = dict(vocab_size=64, max_seq_len=16, d_model=32, n_layer=2, n_head=2)


def make_module(**kwargs) -> LanguageModel:
    module = LanguageModel(ModelConfig(**TINY), **kwargs)
    module.configure_model()
    return module


def test_gradient_clipping_bounds_the_global_norm_and_reports_the_unclipped_one():
    module = make_module()
    logged = module._step_values  # written to the loggers at the end of the step
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
    torch.testing.assert_close(logged["train/grad_norm"], expected)
    assert clipped == pytest.approx(1.0, rel=1e-4)


def test_no_clip_value_still_reports_the_norm_and_leaves_gradients():
    module = make_module()
    logged = module._step_values
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    module.configure_gradient_clipping(None, gradient_clip_val=None)
    n = sum(p.numel() for p in module.parameters())
    assert logged["train/grad_norm"].item() == pytest.approx(n ** 0.5, rel=1e-5)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in module.parameters())


def test_checkpoint_of_another_shape_is_refused_naming_every_mismatch():
    saved = {**ModelConfig(**TINY).__dict__, "d_model": 64, "vocab_size": 128}
    with pytest.raises(ConfigError, match=r"vocab_size: checkpoint 128 vs config 64.*d_model: checkpoint 64"):
        check_compatible(saved, ModelConfig(**TINY))


def test_invalid_training_switches_are_refused():
    with pytest.raises(ConfigError, match="z_loss_coef"):
        LanguageModel(ModelConfig(**TINY), z_loss_coef=-1.0)
    with pytest.raises(ConfigError, match="compile"):
        LanguageModel(ModelConfig(**TINY), compile="everything")


def test_gradient_norm_is_computed_once_per_step_and_shared():
    module = make_module()
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    first = module.gradient_norm()
    for p in module.parameters():
        p.grad = torch.zeros_like(p)  # a second pass would now see 0
    assert module.gradient_norm() is first  # SpikeDetector's call and clipping's share one pass
    module.on_train_batch_start(None, 0)
    assert module.gradient_norm().item() == 0.0


def test_float8_refuses_a_machine_without_a_float8_gpu():
    with pytest.raises(ConfigError, match=r"model.float8=true needs a CUDA GPU of compute capability >= 8.9"):
        make_module(float8=True)


def test_float8_converts_every_linear_but_the_head():
    float8 = pytest.importorskip("torchao.float8")
    from llmtrain.training.module import float8_eligible

    module = LanguageModel(ModelConfig(**TINY | {"d_model": 48, "vocab_size": 72}))
    module.configure_model()
    float8.convert_to_float8_training(module.model, module_filter_fn=float8_eligible)
    kinds = {name: type(m).__name__ for name, m in module.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds.pop("lm_head") == "Linear"
    assert kinds and set(kinds.values()) == {"Float8Linear"}, kinds


def test_a_float8_model_keeps_the_plain_models_state_dict():
    """Float8Linear keeps nn.Linear's parameters, so a float8 run's checkpoint loads into a plain model (export,
    generate, a resume with float8 off) and a plain one into a float8 run."""
    float8 = pytest.importorskip("torchao.float8")
    from llmtrain.training.module import float8_eligible

    config = ModelConfig(**TINY | {"d_model": 48, "vocab_size": 72})
    plain, converted = LanguageModel(config), LanguageModel(config)
    plain.configure_model()
    converted.configure_model()
    float8.convert_to_float8_training(converted.model, module_filter_fn=float8_eligible)
    ours = {k: v.clone() for k, v in plain.model.state_dict().items()}
    theirs = converted.model.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    converted.model.load_state_dict(ours)  # strict
    plain.model.load_state_dict({k: v + 1 for k, v in converted.model.state_dict().items()})
    torch.testing.assert_close(plain.model.state_dict(), {k: v + 1 for k, v in ours.items()})


def test_gradient_clipping_is_left_to_deepspeed_under_a_zero_strategy():
    """Lightning calls the hook under DeepSpeed too, after ZeRO has taken every p.grad: the module must neither
    clip nor log a norm of no gradients (train/grad_norm comes from the engine)."""
    module = make_module()
    logged = module._step_values
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(deepspeed_engine=object()))
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(None, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
    assert logged == {}
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in module.parameters())


def test_compile_mode_is_checked_and_kept_in_the_checkpoint():
    with pytest.raises(ConfigError, match=r"compile_mode='fast' is invalid: choose one of default, reduce-overhead"):
        LanguageModel(ModelConfig(**TINY), compile_mode="fast")
    assert LanguageModel(ModelConfig(**TINY), compile="model", compile_mode="reduce-overhead").hparams[
        "compile_mode"] == "reduce-overhead"


@pytest.mark.parametrize("scope, compiled", [("blocks", True), ("model", False), ("off", False)])
def test_under_compiled_blocks_the_loss_is_compiled_on_its_own(scope: str, compiled: bool):
    """compile: blocks (ZeRO-3's) left the loss eager, on an fp32 copy of the (B, T, V) logits; it is now compiled
    by itself (no parameters, so nothing of ZeRO-3's hooks to trace). Under `model` it is inside the compiled step."""
    from llmtrain.training.loss import cross_entropy_and_z

    module = LanguageModel(ModelConfig(**TINY), compile=scope)
    module.configure_model()  # torch.compile is lazy: nothing compiles here
    loss = module._cross_entropy
    assert (getattr(loss, "_torchdynamo_orig_callable", None) is cross_entropy_and_z) == compiled
    assert (loss is cross_entropy_and_z) == (not compiled)


class _StepRecord(pl.Callback):
    """What each optimizer step trained with, keyed by Lightning's logging step: the mean loss of its micro-batches
    (Lightning hands each micro-batch's loss over divided by their number) and the learning rate it used."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.lr: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr[trainer.fit_loop.epoch_loop._batches_that_stepped] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.loss[step] = self.loss.get(step, 0.0) + outputs["loss"].item()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_train_values_are_written_at_lightnings_logging_steps_with_that_steps_values(accumulate: int):
    record = _StepRecord()
    _, logger = fit(LanguageModel(tiny_config(), OptimConfig(lr=1e-2, warmup_steps=4, total_steps=8)),
                    random_batches(8 * accumulate), [record], max_steps=8, log_every_n_steps=3,
                    accumulate_grad_batches=accumulate)
    scalars = logger.scalars
    for tag in ("train/loss", "train/ce_loss", "train/z_loss", "train/lr", "train/tokens", "train/grad_norm"):
        assert sorted(scalars[tag]) == [2, 5], tag  # optimizer steps 3 and 6, on Lightning's step axis
    for step in (2, 5):
        assert scalars["train/loss"][step] == pytest.approx(record.loss[step], rel=1e-6)
        assert scalars["train/lr"][step] == record.lr[step]  # the rate the step trained with, not the next one
        assert scalars["train/tokens"][step] == (step + 1) * accumulate * 4 * 16


class _Written(pl.Callback):
    """The logging steps whose train/loss the logger holds at the start of each optimizer step."""

    def __init__(self, logger) -> None:
        self.logger, self.at_start = logger, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.at_start[trainer.global_step] = sorted(self.logger.scalars.get("train/loss", {}))


def test_a_logging_steps_values_are_written_a_step_boundary_later_and_the_last_steps_at_once():
    logger = CaptureLogger()
    written = _Written(logger)
    module = LanguageModel(tiny_config(), OptimConfig(lr=1e-2, warmup_steps=1, total_steps=6))
    trainer, _ = fit(module, random_batches(6), [written], max_steps=6, log_every_n_steps=2, logger=logger)
    # Logging steps 1, 3, 5 (optimizer steps 2, 4, 6): step 2's values are queued at its end and written at the end
    # of step 3, so they are missing at the start of step 3 and there at the start of step 4.
    assert written.at_start[2] == [] and written.at_start[3] == [1] and written.at_start[4] == [1]
    assert written.at_start[5] == [1, 3]
    assert sorted(logger.scalars["train/loss"]) == [1, 3, 5]  # the last step's at once, not left pending
    step, values = module.step_log.last
    assert step == trainer.global_step == 6 and values["train/loss"] == logger.scalars["train/loss"][5]


class _FailAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("planted failure")


def test_the_values_of_the_last_logging_step_before_an_error_are_written():
    logger = CaptureLogger()
    module = LanguageModel(tiny_config(), OptimConfig(lr=1e-2, warmup_steps=1, total_steps=6))
    with pytest.raises(RuntimeError, match="planted failure"):
        # Step 2 is a logging step; step 3 fails in a callback, before the module's batch end would write step 2's.
        fit(module, random_batches(6), [_FailAt(3)], max_steps=6, log_every_n_steps=2, logger=logger)
    assert sorted(logger.scalars["train/loss"]) == [1]


class _SyncFreeModule(LanguageModel):
    """Raises at any host synchronization in its own per-step work (torch.cuda.set_sync_debug_mode): the forward
    and loss, clipping, and the batch end of a logging step. A non-logging step's batch end may wait: it writes
    the previous logging step's values, whose event the GPU has passed by then."""

    def _sync_free(self, call, *args):
        if self.trainer.global_step < 2:  # the first steps allocate and warm up
            return call(*args)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return call(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def training_step(self, batch, batch_idx):
        return self._sync_free(super().training_step, batch, batch_idx)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        return self._sync_free(super().configure_gradient_clipping, optimizer, gradient_clip_val,
                               gradient_clip_algorithm)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._logging_step():
            return self._sync_free(super().on_train_batch_end, outputs, batch, batch_idx)
        return super().on_train_batch_end(outputs, batch, batch_idx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_a_logging_step_reads_nothing_on_the_host():
    logger = CaptureLogger()
    module = _SyncFreeModule(tiny_config(), OptimConfig(lr=1e-2, warmup_steps=1, total_steps=8, fused=True))
    fit(module, random_batches(8), [], max_steps=8, log_every_n_steps=2, logger=logger, accelerator="gpu",
        precision="bf16-mixed", gradient_clip_val=1.0)
    assert sorted(logger.scalars["train/loss"]) == [1, 3, 5, 7]


def _fused_pair() -> tuple[LanguageModel, LanguageModel]:
    torch.manual_seed(0)
    first = make_module(optim=OptimConfig(fused=True))
    second = make_module(optim=OptimConfig(fused=True))
    second.model.load_state_dict(first.model.state_dict())
    return first, second


def test_clipping_rides_in_the_fused_adamw_step_and_matches_clipping_first():
    """With torch's fused AdamW the clip is a grad_scale divisor read by the optimizer's own kernel (no pass of its
    own over the gradients); the update and the gradients left behind match clip_grads_with_norm_ then step."""
    for grad in (3.0, 1e-4):  # a global norm above max_norm 1.0 (clipped), and one below (a divisor of exactly 1)
        fused, plain = _fused_pair()
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (fused, plain)]
        for m in (fused, plain):
            for p in m.parameters():
                p.grad = torch.full_like(p, grad)
        fused.configure_gradient_clipping(optimizers[0], gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        assert all(torch.equal(p.grad, torch.full_like(p, grad)) for p in fused.parameters())  # not touched yet
        plain.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        for optimizer in optimizers:
            optimizer.step()
        for a, b in zip(fused.parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
        if grad < 1:
            assert optimizers[0].grad_scale.item() == 1.0
        torch.testing.assert_close(fused._step_values["train/grad_norm"], plain._step_values["train/grad_norm"])
        fused.on_train_batch_start(None, 0)
        assert not hasattr(optimizers[0], "grad_scale")  # for one step only


def test_a_fit_clipping_in_the_fused_step_trains_as_one_clipping_first(monkeypatch):
    """Lightning's order (clipping hook, then optimizer.step) with the divisor: the same weights after four steps as
    a fit whose fused AdamW is made to refuse grad_scale, so that clip_grads_with_norm_ runs."""
    import llmtrain.training.module as module_file

    weights = []
    for takes_scale in (True, False):
        monkeypatch.setattr(module_file, "takes_step_tensors", lambda optimizer, trainer, v=takes_scale: v)
        torch.manual_seed(0)
        model = LanguageModel(tiny_config(), OptimConfig(fused=True, lr=1e-2, warmup_steps=0))
        fit(model, random_batches(4), [], max_steps=4, gradient_clip_val=0.05)
        weights.append(model.model.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=1e-5, atol=1e-6, msg=name)


# Two gloo ranks: the DDP wrapper gets gradient_as_bucket_view and no buffer broadcast by default, a strategy's own
# settings are kept, and the settings change no number (the same weights after 4 steps, each rank on its own data).
DDP_DEFAULTS = r"""
import hashlib, os, torch
import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig
from tests.callbacks import random_batches, tiny_config

rank = int(os.environ["RANK"])

class Wrapper(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.ddp = trainer.strategy.model  # the DistributedDataParallel wrapper while training

for name, strategy in (("defaults", "ddp"), ("given", DDPStrategy(gradient_as_bucket_view=False,
                                                                   broadcast_buffers=True))):
    torch.manual_seed(0)
    model = LanguageModel(tiny_config(), OptimConfig(warmup_steps=1, total_steps=8), z_loss_coef=1e-4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0, callbacks=[wrapper := Wrapper()])
    trainer.fit(model, torch.utils.data.DataLoader(random_batches(4, seed=rank), batch_size=None))
    ddp = wrapper.ddp
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
    print(f"RESULT {name} views={ddp.gradient_as_bucket_view} broadcast={ddp.broadcast_buffers} {digest}", flush=True)
"""


@pytest.mark.slow
def test_under_ddp_gradients_are_bucket_views_and_buffers_are_not_broadcast():
    from tests.conftest import run_deepspeed_ranks

    for output in run_deepspeed_ranks(DDP_DEFAULTS, [], world_size=2):
        defaults, given = [line.split() for line in output.splitlines() if line.startswith("RESULT")]
        assert defaults[2:4] == ["views=True", "broadcast=False"] and given[2:4] == ["views=False", "broadcast=True"]
        assert defaults[4] == given[4], output  # bitwise the same training
