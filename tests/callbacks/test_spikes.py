"""SpikeDetector: the statistic on synthetic series, and each action in real CPU fits: skip_step leaves weights and
optimizer state untouched, rollback equals "resume from the checkpoint and skip the window", NaN is always
caught, the bounds stop the run, DDP ranks decide alike."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from llmtrain.callbacks import PeriodicCheckpoint, SpikeDetector, TrainingDiverged, WeightMonitor
from llmtrain.callbacks.spikes import SpikeStatistics
from llmtrain.data.datamodule import TokenDataModule
from llmtrain.training.optim import OptimConfig
from tests.callbacks import CaptureLogger, SpikeModel, fit, random_batches, tiny_config

OPTIM = OptimConfig(lr=3e-3, warmup_steps=1, total_steps=40)
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ the statistic


def run_statistics(loss: np.ndarray, grad_norm: np.ndarray, **kwargs) -> tuple[list[int], list[float]]:
    options = dict(ema_beta=0.99, warmup_steps=50, threshold=6.0, min_rel_std=0.01)
    options.update(kwargs)
    stats = SpikeStatistics(2, device=torch.device("cpu"), **options)
    spikes, scores = [], []
    for t, x in enumerate(np.stack([loss, grad_norm], axis=1)):
        score, spike = stats.update(torch.tensor(x, dtype=torch.float32))
        scores.append(float(score))
        if spike:
            spikes.append(t)
    return spikes, scores


def noisy_run(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A decaying loss with 1% noise and a log-normal gradient norm, like a healthy run."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = 2.0 + 4.0 * np.exp(-t / 500) + 0.02 * rng.standard_normal(n)
    grad_norm = 0.5 * np.exp(0.2 * rng.standard_normal(n))
    return loss, grad_norm


def test_quiet_on_ordinary_noise():
    loss, grad_norm = noisy_run()
    spikes, scores = run_statistics(loss, grad_norm)
    assert spikes == []
    assert max(scores) < 6.0 and scores[:50] == [0.0] * 50  # nothing is scored during warm-up


def test_fires_on_planted_spikes_and_only_there():
    loss, grad_norm = noisy_run()
    loss[1500] *= 1.3  # +30% loss for one step
    grad_norm[2000] *= 8  # one gradient-norm spike with a normal loss
    spikes, _ = run_statistics(loss, grad_norm)
    assert spikes == [1500, 2000]


def test_nan_is_always_a_spike_and_never_enters_the_statistics():
    loss, grad_norm = noisy_run(200)
    loss[10] = math.nan  # inside the warm-up
    grad_norm[120] = math.inf
    spikes, scores = run_statistics(loss, grad_norm)
    assert spikes == [10, 120] and scores[10] == scores[120] == math.inf
    clean_loss, clean_grad = noisy_run(200)
    keep = [t for t in range(200) if t not in (10, 120)]
    a = SpikeStatistics(2, 0.99, 50, 6.0, 0.01, torch.device("cpu"))
    b = SpikeStatistics(2, 0.99, 50, 6.0, 0.01, torch.device("cpu"))
    for t in range(200):
        a.update(torch.tensor([loss[t], grad_norm[t]], dtype=torch.float32))
    for t in keep:
        b.update(torch.tensor([clean_loss[t], clean_grad[t]], dtype=torch.float32))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var) and a.count == b.count == 198


def test_a_lasting_change_of_level_is_absorbed():
    loss, grad_norm = noisy_run(2500)
    loss[2000:] += 1.0  # +45%, e.g. new data: a change of level, not a spike to skip forever
    spikes, _ = run_statistics(loss, grad_norm)
    assert spikes[0] == 2000 and spikes == list(range(2000, 2000 + len(spikes)))
    assert len(spikes) < 20  # under max_consecutive_spikes: skip_step skips a few steps and trains on


def test_state_dict_resumes_the_statistics_exactly():
    loss, grad_norm = noisy_run(300)
    x = torch.tensor(np.stack([loss, grad_norm], axis=1), dtype=torch.float32)
    straight = SpikeStatistics(2, 0.99, 50, 6.0, 0.01, torch.device("cpu"))
    first = SpikeStatistics(2, 0.99, 50, 6.0, 0.01, torch.device("cpu"))
    scores_straight = [straight.update(v)[0] for v in x]
    for v in x[:150]:
        first.update(v)
    resumed = SpikeStatistics(2, 0.99, 50, 6.0, 0.01, torch.device("cpu"))
    resumed.load_state_dict(first.state_dict())
    assert [resumed.update(v)[0] for v in x[150:]] == scores_straight[150:]


def test_invalid_action_is_refused():
    with pytest.raises(ValueError, match="action='restart'"):
        SpikeDetector(action="restart")


# --------------------------------------------------------------------------------------------- skip_step


class StepWatch(pl.Callback):
    """Did parameters and optimizer state change during each step?"""

    def __init__(self) -> None:
        self.changed: dict[int, tuple[bool, bool]] = {}

    @staticmethod
    def _optimizer_state(trainer: pl.Trainer) -> list[torch.Tensor]:
        state = trainer.optimizers[0].state
        return [v.clone() for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._params = [p.detach().clone() for p in pl_module.parameters()]
        self._state = self._optimizer_state(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = any(not torch.equal(a, p) for a, p in zip(self._params, pl_module.parameters()))
        now = self._optimizer_state(trainer)
        state = len(now) != len(self._state) or any(not torch.equal(a, b) for a, b in zip(self._state, now))
        self.changed[trainer.global_step - 1] = (params, state)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-on-device", "foreach-on-host"])
@pytest.mark.parametrize("plant", [1e3, math.nan], ids=["spike", "nan"])
def test_skip_step_leaves_weights_and_optimizer_state_unchanged(fused, plant):
    torch.manual_seed(0)
    optim = OptimConfig(lr=3e-3, warmup_steps=1, total_steps=40, weight_decay=0.1, fused=fused)
    model = SpikeModel(tiny_config(), optim, plant={6: plant})
    detector, watch = SpikeDetector(action="skip_step", warmup_steps=3), StepWatch()
    trainer, logger = fit(model, random_batches(8), [watch, detector], max_steps=8, gradient_clip_val=1.0)
    assert [e["step"] for e in detector.events] == [6]
    assert watch.changed[6] == (False, False)  # no update, no moment update, no weight decay, no Adam step count
    assert all(watch.changed[s] == (True, True) for s in range(8) if s != 6)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 8  # the step counter and the LR schedule still advance
    assert logger.scalars["stability/spike/events"] == {6: 1.0}
    assert sorted(logger.scalars["stability/spike/score"]) == list(range(8))


def test_log_action_only_records():
    torch.manual_seed(0)
    model = SpikeModel(tiny_config(), OPTIM, plant={6: 1e3})
    detector, watch = SpikeDetector(action="log", warmup_steps=3), StepWatch()
    fit(model, random_batches(8), [watch, detector], max_steps=8)
    assert [e["step"] for e in detector.events] == [6] and detector.events[0]["score"] > 100
    assert watch.changed[6] == (True, True)


def test_skip_step_stops_after_too_many_spikes_in_a_row():
    torch.manual_seed(0)
    model = SpikeModel(tiny_config(), OPTIM, plant={c: math.nan for c in range(4, 40)})
    detector = SpikeDetector(action="skip_step", warmup_steps=2, max_consecutive_spikes=3, max_nonfinite_steps=10)
    with pytest.raises(TrainingDiverged, match="4 spikes in a row"):
        fit(model, random_batches(8), [detector], max_steps=20)


def test_resumed_detector_scores_like_the_uninterrupted_one(tmp_path):
    """The statistics travel in the checkpoint; decisions in flight are logged before it is written."""
    batches = random_batches(1) * 8  # one batch over and over: a resumed in-memory loader restarts its epoch
    scores = {}
    for name, steps, ckpt in (("straight", 10, None), ("first", 5, None),
                              ("resumed", 10, tmp_path / "first" / "step0000005.ckpt")):
        torch.manual_seed(0)
        detector = SpikeDetector(action="skip_step", warmup_steps=2)
        callbacks = [detector, PeriodicCheckpoint(dirpath=str(tmp_path / name), every_n_steps=5)]
        model = SpikeModel(tiny_config(), OPTIM)
        logger = CaptureLogger()
        trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=logger, callbacks=callbacks,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=ckpt)
        scores[name] = logger.scalars["stability/spike/score"]
    assert sorted(scores["first"]) == list(range(5))  # step 4's score was flushed when the checkpoint was written
    assert scores["first"] == {s: v for s, v in scores["straight"].items() if s < 5}
    assert scores["resumed"] == {s: v for s, v in scores["straight"].items() if s >= 5}
    state = torch.load(tmp_path / "first" / "step0000005.ckpt", weights_only=True)["callbacks"]["SpikeDetector"]
    assert state["stats"]["count"] == 5


# ---------------------------------------------------------------------------------------------- rollback


class Skip(pl.Callback):
    """The reference for a rollback: resume from a checkpoint and skip n samples of the stream."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_fit_start(self, trainer, pl_module):  # after the checkpoint's data position is restored
        trainer.datamodule.skip_train_samples(self.n)


def data_fit(corpus: dict, model: SpikeModel, callbacks: list, max_steps: int, root: Path, ckpt_path=None):
    datamodule = TokenDataModule(data_dir=str(corpus["shards"]), seq_len=16, micro_batch_size=4, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=CaptureLogger(),
                         callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=root,
                         enable_checkpointing=any(isinstance(c, PeriodicCheckpoint) for c in callbacks))
    trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    return trainer, datamodule


def test_rollback_resumes_from_the_last_checkpoint_and_skips_the_window(prepared_corpus, tmp_path):
    config = tiny_config(vocab_size=320)
    B, spike_call, max_steps = 4, 6, 10

    torch.manual_seed(0)
    model = SpikeModel(config, OPTIM, plant={spike_call: 1e3})
    detector = SpikeDetector(action="rollback", warmup_steps=3)
    checkpoints = PeriodicCheckpoint(dirpath=str(tmp_path / "rolled"), every_n_steps=4, keep=5)
    trainer, datamodule = data_fit(prepared_corpus, model, [detector, checkpoints], max_steps, tmp_path)

    # The spike at step 6 rolled back to the step-4 checkpoint; batches 4, 5, 6 of the stream were dropped.
    assert len(detector.events) == 1 and detector.events[0]["rolled_back_to"] == 4
    assert [step for step, _ in model.calls] == list(range(7)) + list(range(4, 10))
    assert trainer.global_step == max_steps and detector.rollbacks == 1
    assert datamodule.consumed_samples == (max_steps + 3) * B

    # Reference: the same run up to the step-4 checkpoint, resumed with the window skipped by the data API.
    torch.manual_seed(0)
    first = SpikeModel(config, OPTIM)
    data_fit(prepared_corpus, first, [PeriodicCheckpoint(dirpath=str(tmp_path / "ref"), every_n_steps=4)], 4, tmp_path)
    torch.manual_seed(1)  # the restored checkpoint, not the seed, must decide
    resumed = SpikeModel(config, OPTIM)
    data_fit(prepared_corpus, resumed, [Skip(3 * B)], max_steps, tmp_path,
             ckpt_path=str(tmp_path / "ref" / "step0000004.ckpt"))

    assert [ids.tolist() for _, ids in model.calls[7:]] == [ids.tolist() for _, ids in resumed.calls]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # bit for bit on CPU


def test_rollback_stops_after_max_rollbacks(tmp_path):
    torch.manual_seed(0)
    model = SpikeModel(tiny_config(), OPTIM, plant={6: 1e3, 9: 1e3})
    detector = SpikeDetector(action="rollback", warmup_steps=3, max_rollbacks=1)
    checkpoints = PeriodicCheckpoint(dirpath=str(tmp_path), every_n_steps=2)
    with pytest.raises(TrainingDiverged, match=r"after 1 rollbacks \(max_rollbacks=1\)"):
        fit(model, random_batches(8), [detector, checkpoints], max_steps=20)
    assert detector.rollbacks == 1 and len(detector.events) == 2


def test_rollback_without_a_checkpoint_yet_skips_the_step(tmp_path):
    torch.manual_seed(0)
    model = SpikeModel(tiny_config(), OPTIM, plant={5: math.nan})
    detector, watch = SpikeDetector(action="rollback", warmup_steps=3), StepWatch()
    checkpoints = PeriodicCheckpoint(dirpath=str(tmp_path), every_n_steps=100)
    fit(model, random_batches(8), [watch, detector, checkpoints], max_steps=8)
    assert detector.events[0]["response"] == "skip_step" and detector.rollbacks == 0
    assert watch.changed[5] == (False, False)


def test_rollback_needs_a_checkpoint_callback():
    with pytest.raises(ValueError, match="needs a checkpoint callback"):
        fit(SpikeModel(tiny_config(), OPTIM), random_batches(2), [SpikeDetector(action="rollback")], max_steps=1)


# -------------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import json, sys, torch, lightning.pytorch as pl
from llmtrain.callbacks import SpikeDetector
from llmtrain.training.optim import OptimConfig
from tests.callbacks import SpikeModel, random_batches, tiny_config
from tests.callbacks.test_spikes import StepWatch

class RankSpike(SpikeModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e3 if self.global_rank == 1 and len(self.calls) == 7 else loss  # only rank 1 spikes

if __name__ == "__main__":
    torch.manual_seed(0)
    model = RankSpike(tiny_config(), OptimConfig(lr=3e-3, warmup_steps=1, total_steps=40))
    detector, watch = SpikeDetector(action="skip_step", warmup_steps=3), StepWatch()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[watch, detector])
    trainer.fit(model, torch.utils.data.DataLoader(random_batches(16), batch_size=None))
    out = {"events": [e["step"] for e in detector.events], "changed": {str(k): v for k, v in watch.changed.items()}}
    json.dump(out, open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w"))
"""


def test_ddp_ranks_take_the_same_decision(tmp_path):
    script = tmp_path / "ddp_spike.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:  # rank 0's own loss was ordinary: it skipped because the mean over ranks spiked
        assert rank["events"] == [6]
        assert rank["changed"]["6"] == [False, False] and rank["changed"]["5"] == [True, True]


def test_a_monitor_after_the_detector_is_refused_naming_the_order():
    detector = SpikeDetector(action="rollback")
    with pytest.raises(ValueError, match="SpikeDetector comes before WeightMonitor; put it after the stability"):
        fit(SpikeModel(tiny_config(), OPTIM), random_batches(2), [detector, WeightMonitor(every_n_steps=1)],
            max_steps=1)
