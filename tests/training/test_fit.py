"""End-to-end `llmtrain fit` on CPU: logs, checkpoints, exact resume under DDP, safety checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtrain.events import read_scalars
from tests.conftest import llmtrain

pytestmark = pytest.mark.slow


CALLBACKS = json.dumps([{"class_path": "llmtrain.callbacks.PeriodicCheckpoint",
                         "init_args": {"every_n_steps": 4, "keep": 2}}])


def fit_args(corpus: dict[str, Path], run_root: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [
        "fit", "--config", "configs/quickstart.yaml",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(run_root), "--trainer.logger.init_args.name", name,
        "--trainer.callbacks", CALLBACKS,
        "--model.config.vocab_size", "320", "--model.config.d_model", "32", "--model.config.n_layer", "2",
        "--model.config.n_head", "2", "--model.config.max_seq_len", "32",
        "--model.optim.total_steps", "8", "--model.optim.warmup_steps", "2",
        "--data.data_dir", str(corpus["shards"]), "--data.seq_len", "32", "--data.micro_batch_size", "4",
        "--data.num_workers", "0", "--data.global_batch_size", "null", *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(prepared_corpus, tmp_path_factory) -> Path:
    """An 8-step run, fitted once for the tests that read it or are refused over it (a refusal writes nothing)."""
    root = tmp_path_factory.mktemp("finished")
    llmtrain(*fit_args(prepared_corpus, root, "run", 8))
    return root


def test_fit_writes_tensorboard_config_and_safe_checkpoints(finished_run):
    run = finished_run / "run"
    scalars = read_scalars(run)
    for tag in ("train/loss", "train/ce_loss", "train/z_loss", "train/lr", "train/grad_norm", "train/tokens", "val/loss", "val/ppl",
                "val/bpb"):
        assert tag in scalars, f"{tag} not logged; have {sorted(scalars)}"
    assert scalars["train/tokens"][7] == 8 * 4 * 32  # global tokens after 8 steps of 4 x 32
    assert (run / "config.yaml").is_file()
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.resolve().name == "step0000008.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # no pickled objects: safe to load
    assert "d_model: 32" in checkpoint["llmtrain"]["run_config"]
    assert checkpoint["hyper_parameters"]["config"]["d_model"] == 32

    out = llmtrain("generate", "--ckpt", str(last), "--prompt", "The king", "--max_new_tokens", "5")
    assert out.stdout.startswith("The king")


def test_resume_under_ddp_is_bitwise_equal_to_uninterrupted(prepared_corpus, tmp_path):
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", "2")
    llmtrain(*fit_args(prepared_corpus, tmp_path, "straight", 8, *ddp))
    llmtrain(*fit_args(prepared_corpus, tmp_path, "resumed", 4, *ddp))
    llmtrain(*fit_args(prepared_corpus, tmp_path, "resumed", 8, *ddp, "--ckpt_path", "last"))
    straight = read_scalars(tmp_path / "straight")["train/loss"]
    resumed = read_scalars(tmp_path / "resumed")["train/loss"]
    assert sorted(straight) == list(range(8)) or len(straight) == 8
    assert resumed == straight  # every step, bit for bit (float32 through TensorBoard)
    # The data stream continued too: 2 ranks x 4 samples x 32 tokens per step.
    assert read_scalars(tmp_path / "resumed")["train/tokens"][7] == 8 * 2 * 4 * 32
    assert (tmp_path / "resumed" / "checkpoints" / "last.ckpt").resolve().name == "step0000008.ckpt"


def test_ddp_checkpoint_resumes_on_another_world_size(prepared_corpus, tmp_path):
    # 2 ranks x 4 samples for 4 steps, then 1 rank x 8 samples: the same global batch, so the run goes on as if it
    # had run on one rank throughout (a DDP checkpoint holds whole tensors; the data position is global).
    llmtrain(*fit_args(prepared_corpus, tmp_path, "moved", 4, "--trainer.strategy", "ddp", "--trainer.devices", "2"))
    one_rank = ("--data.micro_batch_size", "8")
    llmtrain(*fit_args(prepared_corpus, tmp_path, "moved", 8, *one_rank, "--ckpt_path", "last"))
    llmtrain(*fit_args(prepared_corpus, tmp_path, "single", 8, *one_rank))
    moved, single = (read_scalars(tmp_path / name) for name in ("moved", "single"))
    # Steps 0-3 of "moved" log rank 0's half of the batch; from step 4 on both log the whole global batch.
    for step in range(4, 8):
        assert moved["train/loss"][step] == pytest.approx(single["train/loss"][step], rel=1e-4), step
    assert moved["train/tokens"][7] == single["train/tokens"][7] == 8 * 8 * 32


def test_refuses_checkpoint_of_another_architecture(prepared_corpus, finished_run):
    with pytest.raises(AssertionError, match=r"d_model: checkpoint 32 vs config 64"):
        llmtrain(*fit_args(prepared_corpus, finished_run, "run", 8, "--model.config.d_model", "64",
                           "--ckpt_path", "last"))


def test_refuses_a_zero_folder_without_deepspeed_before_training(prepared_corpus, tmp_path):
    folder = tmp_path / "zero.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    with pytest.raises(AssertionError, match=r"zero.ckpt is a DeepSpeed ZeRO checkpoint folder, but this run's "
                                             r"strategy is SingleDeviceStrategy: resume it under the ZeRO config"):
        llmtrain(*fit_args(prepared_corpus, tmp_path, "run", 4, "--ckpt_path", str(folder)))
    assert not list(tmp_path.rglob("step*.ckpt"))  # refused before any training step


def test_refuses_fresh_run_over_existing_checkpoints(prepared_corpus, finished_run):
    with pytest.raises(AssertionError, match="already holds checkpoints"):
        llmtrain(*fit_args(prepared_corpus, finished_run, "run", 4))


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
real_replace, calls = os.replace, []

def dying_replace(src, dst, *args, **kwargs):
    # The second checkpoint is fully written and fsynced under its temporary name; die before it is renamed.
    if str(dst).endswith(".ckpt"):
        calls.append(dst)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

os.replace = dying_replace
from llmtrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_save_keeps_the_previous_checkpoint_loadable(prepared_corpus, tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(KILL_DURING_SECOND_SAVE)
    args = fit_args(prepared_corpus, tmp_path, "run", 8)
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    last = checkpoints / "last.ckpt"
    assert last.resolve().name == "step0000004.ckpt"
    torch.load(last, weights_only=True)
    # And training resumes from it to the end.
    llmtrain(*fit_args(prepared_corpus, tmp_path, "run", 8, "--ckpt_path", "last"))
    assert (checkpoints / "last.ckpt").resolve().name == "step0000008.ckpt"
