"""Checkpoint faults: foreign code in a checkpoint folder never runs; the final step is saved; a kill during a save
(TMPDIR on another filesystem) leaves no truncated checkpoint and no orphan; `last` skips what is not whole."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from llmtrain.callbacks import PeriodicCheckpoint
from llmtrain.checkpointing.convert import convert_checkpoint, convert_to_universal
from llmtrain.checkpointing.hf import export_hf
from llmtrain.checkpointing.readers import CheckpointError
from llmtrain.checkpointing.resume import newest_checkpoint
from llmtrain.checkpointing.save import AtomicCheckpointIO
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig
from llmtrain.training.strategy import ZeroStrategy
from tests.callbacks import fit, random_batches, tiny_config

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this creates `marker`: what a planted checkpoint would do instead of touching a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def zero_strategy() -> ZeroStrategy:
    """ZeroStrategy as the Trainer sets it up on one process, for its load path (no engine is built)."""
    strategy = ZeroStrategy(stage=2)
    strategy.parallel_devices = [torch.device("cpu")]
    return strategy


def plant(folder: Path, tag: str, marker: Path) -> Path:
    """A ZeRO-shaped folder whose `latest` names `tag`: benign tensors under `tag` (what a check of that path reads)
    and, where DeepSpeed would look when handed the tag's last part, files that run Payload when unpickled."""
    benign, armed = folder / tag, folder / Path(tag).name
    for where, value in ((benign, torch.zeros(1)), (armed, Payload(marker))):
        where.mkdir(parents=True, exist_ok=True)
        torch.save({"module": value}, where / "mp_rank_00_model_states.pt")
        torch.save({"state": value}, where / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (folder / "latest").write_text(tag)
    return folder


@pytest.mark.parametrize("tag", ["decoy/checkpoint", "../checkpoint", "/abs/checkpoint", ".", ""])
@pytest.mark.parametrize("action", ["convert", "export", "universal", "resume"])
def test_a_latest_that_is_not_a_plain_folder_name_is_refused_before_anything_is_unpickled(
        tmp_path: Path, tag: str, action: str) -> None:
    marker = tmp_path / "payload-ran"
    folder = plant(tmp_path / "run" / "step0000002.ckpt", tag, marker) if tag not in ("", ".") else None
    if folder is None:  # nothing to plant at an empty or "." tag: the armed files sit in the folder itself
        folder = plant(tmp_path / "run" / "step0000002.ckpt", "checkpoint", marker)
        (folder / "latest").write_text(tag)
    run = {"convert": lambda: convert_checkpoint(str(folder), str(tmp_path / "out.ckpt")),
           "export": lambda: export_hf(str(folder), str(tmp_path / "hf")),
           "universal": lambda: convert_to_universal(str(folder), str(tmp_path / "universal.ckpt")),
           # `llmtrain fit --ckpt_path FOLDER` under ZeRO: the strategy's load, before DeepSpeed's engine is touched.
           "resume": lambda: zero_strategy().load_checkpoint(str(folder))}[action]
    with pytest.raises(CheckpointError, match="not a plain folder name|is no folder|is a link"):
        run()
    assert not marker.exists(), "the planted payload ran"


def test_a_tag_folder_that_links_out_of_the_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    elsewhere = plant(tmp_path / "elsewhere", "checkpoint", marker) / "checkpoint"
    folder = tmp_path / "run.ckpt"
    folder.mkdir()
    (folder / "checkpoint").symlink_to(elsewhere, target_is_directory=True)
    (folder / "latest").write_text("checkpoint")
    with pytest.raises(CheckpointError, match="is a link"):
        convert_checkpoint(str(folder), str(tmp_path / "out.ckpt"))
    assert not marker.exists()


def test_a_payload_anywhere_in_the_tag_folder_stops_a_resume_before_deepspeed_reads_it(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    folder = plant(tmp_path / "run.ckpt", "checkpoint", marker)
    for file in (folder / "checkpoint").glob("*.pt"):  # make the expected files benign ...
        torch.save({"module": torch.zeros(1)}, file)
    torch.save({"x": Payload(marker)}, folder / "checkpoint" / "extra_states.pt")  # ... and plant one more
    with pytest.raises(CheckpointError, match="extra_states.pt: refused"):
        zero_strategy().load_checkpoint(str(folder))
    assert not marker.exists()


def test_a_linked_parameter_folder_in_a_universal_checkpoint_stops_a_resume(tmp_path: Path) -> None:
    """DeepSpeed's universal loader reads `zero/<parameter>/*.pt` by the model's parameter names; a glob does not walk
    into a linked folder, so a link there would be read by DeepSpeed and never checked."""
    marker = tmp_path / "payload-ran"
    folder = plant(tmp_path / "step0000002-universal.ckpt", "checkpoint", marker)
    (folder / "latest").rename(folder / "latest_universal")
    for file in (folder / "checkpoint").glob("*.pt"):
        torch.save({"module": torch.zeros(1)}, file)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save({"param": Payload(marker)}, elsewhere / "fp32.pt")
    (folder / "checkpoint" / "zero").mkdir()
    (folder / "checkpoint" / "zero" / "model.lm_head.weight").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CheckpointError, match="model.lm_head.weight: a link to"):
        zero_strategy().load_checkpoint(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("planted", ["extra/mp_rank_00_model_states.pt", "mp_rank_01_model_states"])
def test_every_file_deepspeed_s_converter_may_pick_is_checked_first(tmp_path: Path, zero_folders,
                                                                    planted: str) -> None:
    """ds_to_universal (ZeRO-1/2) unpickles every file whose name starts with mp_rank_/zero_pp_rank_, at any depth and
    with any suffix: `convert --universal` (and reshard_on_resume, which calls it) checks each one first."""
    marker = tmp_path / "payload-ran"
    folder = Path(shutil.copytree(zero_folders(2, 2)[0], tmp_path / "step0000002.ckpt"))
    (folder / "checkpoint" / planted).parent.mkdir(exist_ok=True)
    torch.save({"x": Payload(marker)}, folder / "checkpoint" / planted)
    with pytest.raises(CheckpointError, match=f"{Path(planted).name}: refused"):
        convert_to_universal(str(folder), str(tmp_path / "universal.ckpt"), workers=1)
    assert not marker.exists() and not (tmp_path / "universal.ckpt").exists()


def test_last_skips_a_folder_whose_latest_is_not_a_plain_folder_name(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "payload-ran"
    plant(tmp_path / "step0000004.ckpt", "decoy/checkpoint", marker)
    plant(tmp_path / "step0000002.ckpt", "checkpoint", marker)
    assert newest_checkpoint([tmp_path]) == tmp_path / "step0000002.ckpt"
    err = capsys.readouterr().err
    assert "skipping" in err and "step0000004.ckpt: " in err
    assert "'decoy/checkpoint', which is not a plain folder" in err
    assert not marker.exists()


def test_single_file_loads_unpickle_no_code_whatever_the_caller_or_torch_s_default(tmp_path: Path,
                                                                                monkeypatch) -> None:
    """`fit --ckpt_path FILE`, validate and SpikeDetector's rollback load through the strategy's CheckpointIO, which
    PeriodicCheckpoint makes AtomicCheckpointIO: weights_only=True whatever the caller passes, and whatever torch's
    default (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns a weights_only left unset into False)."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, planted = tmp_path / "payload-ran", tmp_path / "planted.ckpt"
    torch.save({"state_dict": {}, "x": Payload(marker)}, planted)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[PeriodicCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_steps=2)])
    model = LanguageModel(tiny_config(), OptimConfig(warmup_steps=1, total_steps=20))
    with pytest.raises(Exception, match="Weights only load failed"):
        trainer.fit(model, torch.utils.data.DataLoader(random_batches(4), batch_size=None), ckpt_path=str(planted))
    assert not marker.exists()
    with pytest.raises(Exception, match="Weights only load failed"):
        trainer.strategy.load_checkpoint(planted, weights_only=False)
    assert not marker.exists()


# Two ZeRO-3 ranks, each holding its partition of every parameter: a NaN in rank 1's partition alone stops the save
# on both ranks (rank 0 cannot see it), and a finite save goes through ZeroStrategy's folder save on both.
ZERO3_NONFINITE = r"""
import json, os, sys
from types import SimpleNamespace
import torch, deepspeed
from lightning.fabric.plugins.environments import LightningEnvironment
from llmtrain.checkpointing.save import NonFiniteWeights, refuse_nonfinite_weights
from llmtrain.model import ModelConfig
from llmtrain.training.module import LanguageModel
from llmtrain.training.strategy import ZeroStrategy

folder, rank, world_size = sys.argv[1], int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
module = LanguageModel(ModelConfig(**json.loads(sys.argv[2])))
ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
with deepspeed.zero.Init(config_dict_or_path=ds_config):
    module.configure_model()
engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds_config)
strategy = ZeroStrategy(stage=3)
strategy.cluster_environment = LightningEnvironment()
strategy.cluster_environment.set_global_rank(rank)
strategy.cluster_environment.set_world_size(world_size)
strategy.parallel_devices = [torch.device("cpu")] * world_size
strategy.model, strategy._lightning_module = engine, module
trainer = SimpleNamespace(strategy=strategy, global_step=7)
refuse_nonfinite_weights(trainer, module.model)
strategy.save_checkpoint({"global_step": 7}, os.path.join(folder, "step0000007.ckpt"))
param = next(p for p in module.model.parameters() if p.ds_tensor.numel() > 1)
if rank == 1:
    with torch.no_grad():
        param.ds_tensor[1] = float("nan")
try:
    refuse_nonfinite_weights(trainer, module.model)
    print("not refused")
except NonFiniteWeights as error:
    print("refused:", error)
"""


@pytest.mark.slow
def test_under_zero3_a_nan_in_one_rank_s_partition_stops_the_save_on_every_rank(tmp_path: Path) -> None:
    from tests.conftest import run_deepspeed_ranks
    from tests.training.test_universal_checkpoint import TINY_JSON

    outputs = run_deepspeed_ranks(ZERO3_NONFINITE, [str(tmp_path), TINY_JSON], world_size=2)
    assert "not saving a checkpoint at step 7" in outputs[0] and "(on another rank)" in outputs[0], outputs[0][-2000:]
    assert "not saving a checkpoint at step 7" in outputs[1] and "(this rank: " in outputs[1], outputs[1][-2000:]
    shards = sorted(p.name for p in (tmp_path / "step0000007.ckpt" / "checkpoint").iterdir())
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    assert not list(tmp_path.glob(".tmp.*"))


# ------------------------------------------------------------------------------------- what a fit writes, and when

class SaveCounter(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize("max_steps, saved", [(7, [5, 7]), (10, [5, 10])])
def test_the_step_a_fit_ends_at_is_saved_once(tmp_path: Path, max_steps: int, saved: list[int]) -> None:
    counter = SaveCounter()
    checkpoints = PeriodicCheckpoint(dirpath=str(tmp_path), every_n_steps=5, every_minutes=60, keep=3)
    fit(LanguageModel(tiny_config(), OptimConfig(warmup_steps=1, total_steps=20)), random_batches(12),
        [checkpoints, counter],
        max_steps=max_steps)
    assert counter.steps == saved  # no second write of a step that was just saved
    assert (tmp_path / "last.ckpt").resolve().name == f"step{max_steps:07d}.ckpt"
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == max_steps


class ClockAdvance(pl.Callback):
    """Moves PeriodicCheckpoint's clock an hour back when step `step` starts: its time trigger is due at its end."""

    def __init__(self, checkpoints: PeriodicCheckpoint, step: int) -> None:
        self.checkpoints, self.step = checkpoints, step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.checkpoints._since_save -= 3600


def test_the_time_trigger_saves_the_step_it_is_due_at_on_one_process(tmp_path: Path) -> None:
    counter = SaveCounter()
    checkpoints = PeriodicCheckpoint(dirpath=str(tmp_path), every_n_steps=None, every_minutes=30, keep=3)
    fit(LanguageModel(tiny_config(), OptimConfig(warmup_steps=1, total_steps=20)), random_batches(12),
        [checkpoints, counter, ClockAdvance(checkpoints, 3)], max_steps=7)
    assert counter.steps == [4, 7]  # due at the end of step 4 (global_step 3 -> 4), then the end of the fit


def test_the_state_key_is_the_one_earlier_checkpoints_were_written_under() -> None:
    """Lightning files a callback's state in a checkpoint under its state_key; with another key a resumed run loses
    which checkpoints to rotate away. This is the key of the shipped configs' PeriodicCheckpoint in checkpoints
    written while ModelCheckpoint's own time trigger held `every_minutes`."""
    key = PeriodicCheckpoint(every_n_steps=1000, every_minutes=30, keep=3).state_key
    assert key == ("PeriodicCheckpoint{'monitor': 'step', 'mode': 'max', 'every_n_train_steps': 1000, "
                   "'every_n_epochs': 0, 'train_time_interval': datetime.timedelta(seconds=1800)}")


@pytest.mark.slow
def test_under_ddp_the_step_a_fit_ends_at_is_saved(prepared_corpus, tmp_path: Path) -> None:
    """Two gloo ranks through the real CLI and the shipped config: saves at 4 (periodic) and 6 (the end), not again."""
    from tests.conftest import llmtrain
    from tests.training.test_fit import fit_args

    llmtrain(*fit_args(prepared_corpus, tmp_path, "ddp", 6, "--trainer.strategy", "ddp", "--trainer.devices", "2"))
    folder = tmp_path / "ddp" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step0000004.ckpt", "step0000006.ckpt"]
    assert (folder / "last.ckpt").resolve().name == "step0000006.ckpt"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6


# A fit whose save at step 4 blocks inside torch.save (an object that sleeps while pickled): the parent kills it
# with SIGKILL there, the way a node failure or the end of SLURM's grace period would.
KILLED_SAVE = r"""
import sys, time
import torch
sys.path.insert(0, sys.argv[2])
import lightning.pytorch as pl
from llmtrain.callbacks import PeriodicCheckpoint
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig
from tests.callbacks import fit, random_batches, tiny_config

class Sleeper:
    def __reduce__(self):
        print("SAVING", flush=True)
        time.sleep(600)
        return int, ()

class BlockTheSaveAtStep4(pl.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == 4:
            checkpoint["blocker"] = Sleeper()

checkpoints = PeriodicCheckpoint(dirpath=sys.argv[1], every_n_steps=2, keep=3)
fit(LanguageModel(tiny_config(), OptimConfig(warmup_steps=1, total_steps=20)), random_batches(8),
    [checkpoints, BlockTheSaveAtStep4()],
    max_steps=8)
"""


class FirstStep(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step


def test_a_kill_during_a_save_with_tmpdir_elsewhere_leaves_nothing_behind(tmp_path: Path) -> None:
    tmpdir = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    try:
        if tmpdir is None or tmpdir.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("no second filesystem (/dev/shm) to put TMPDIR on")
        folder = tmp_path / "checkpoints"
        env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(folder), str(REPO)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = []
        try:
            for line in proc.stdout:
                output.append(line)
                if line.startswith("SAVING"):
                    break
        finally:
            proc.kill()  # SIGKILL inside torch.save of step 4 (or, if the test failed first, wherever it is)
            proc.wait(timeout=60)
        assert output and output[-1].startswith("SAVING"), "".join(output)[-3000:]
        assert sorted(p.name for p in tmpdir.iterdir()) == [], "the save left files in TMPDIR"
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".tmp.step0000004.ckpt", "last.ckpt", "step0000002.ckpt"]  # no truncated step0000004.ckpt
    assert newest_checkpoint([folder]) == folder / "last.ckpt"
    assert (folder / "last.ckpt").resolve().name == "step0000002.ckpt"
    # --ckpt_path last resumes from the newest whole checkpoint, and saving step 4 again clears the stale temp file.
    first = FirstStep()
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[PeriodicCheckpoint(dirpath=str(folder), every_n_steps=2, keep=3), first])
    trainer.fit(LanguageModel(tiny_config(), OptimConfig(warmup_steps=1, total_steps=20)),
                torch.utils.data.DataLoader(random_batches(8), batch_size=None),
                ckpt_path=str(newest_checkpoint([folder])), weights_only=True)
    assert first.step == 2 and trainer.global_step == 4
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]


def test_a_failed_write_keeps_the_old_file_and_a_remote_path_is_left_to_fsspec(tmp_path: Path, monkeypatch) -> None:
    import fsspec

    target = tmp_path / "step0000002.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    with pytest.raises(Exception):  # a lambda cannot be pickled: the write fails half-way
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "bad": lambda: None}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["step0000002.ckpt"]
    assert torch.load(target, weights_only=True) == {"global_step": 1}
    monkeypatch.chdir(tmp_path)
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, "memory://run/step0000003.ckpt")
    with fsspec.open("memory://run/step0000003.ckpt", "rb") as f:
        assert torch.load(f, weights_only=True) == {"global_step": 3}
    assert not (tmp_path / "memory:").exists()


def test_last_skips_and_names_every_checkpoint_that_is_not_whole(tmp_path: Path, capsys) -> None:
    fit(LanguageModel(tiny_config(), OptimConfig(warmup_steps=1, total_steps=20)), random_batches(8),
        [PeriodicCheckpoint(dirpath=str(tmp_path), every_n_steps=2, keep=3)], max_steps=4)
    (tmp_path / "last.ckpt").unlink()  # killed between removing the old link and making the new one
    whole = (tmp_path / "step0000004.ckpt").read_bytes()
    (tmp_path / "step0000006.ckpt").write_bytes(whole[: len(whole) // 2])  # truncated by a kill mid-copy
    (tmp_path / "step0000008.ckpt").symlink_to(tmp_path / "gone.ckpt")
    assert newest_checkpoint([tmp_path]) == tmp_path / "step0000004.ckpt"
    err = capsys.readouterr().err
    assert "skipping" in err and "step0000006.ckpt: not a whole checkpoint file" in err
    assert "step0000008.ckpt: a link to" in err
