"""The face of `llmtrain`: top-level help, one-line errors, fit --help, a finished run's resume, the LR schedule kept
on extension, and progress lines when output is not a terminal.

Commands run in this process through llmtrain.cli.main (what the console script calls), on the tiny model of
tests/launch/conftest.py; tests/training/test_fit.py runs the console script itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from llmtrain.cli import (LIGHTNING_COMMANDS, PURPOSES, TOOL_COMMANDS, _remove_empty_run, is_user_error,
                          user_error)
from llmtrain.events import read_scalars
from llmtrain.model.config import ConfigError
from llmtrain.training.optim import OptimConfig, ScheduleLR
from tests.launch.conftest import tiny_config
from tests.test_configs import cli


def test_top_level_help_lists_every_command_with_its_purpose(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    for name in (*LIGHTNING_COMMANDS, *TOOL_COMMANDS):
        assert PURPOSES.get(name), f"command {name!r} has no one-line purpose in llmtrain.cli.PURPOSES"
        assert any(line.split()[:1] == [name] and PURPOSES[name] in line for line in out.splitlines()), out
    assert "predict" not in out and "LLMTRAIN_DEBUG" in out
    code, bare, _ = cli(capsys)
    assert code == 2 and bare == out


def test_predict_is_not_offered(capsys):
    code, _, err = cli(capsys, "predict", "--config", "configs/quickstart.yaml")
    assert code == 2 and "unknown command 'predict'" in err and "export" in err


def test_fit_help_shows_choices_and_meanings_and_no_ignored_options(capsys):
    code, out, _ = cli(capsys, "fit", "--help")
    assert code == 0
    assert "--model.config.norm {rmsnorm,layernorm}" in out
    assert "--model.config.position {rope,learned,sinusoidal,alibi,none}" in out
    assert "grouped-" in out and "rmsnorm (Llama)" in out  # the fields' meanings, from ModelConfig's docstring
    assert "--optimizer" not in out and "--lr_scheduler" not in out
    assert out.startswith("usage: llmtrain fit [--config FILE ...]")
    code, out, _ = cli(capsys, "fit", "--model.optim.help")
    assert code == 0 and "--model.optim.schedule {cosine,wsd,constant}" in out and "peak learning rate" in out


@pytest.mark.parametrize("override, expected", [
    (["--model.config.norm", "batchnorm"],
     "error: model.config.norm='batchnorm' is invalid: choose one of rmsnorm, layernorm"),
    (["--model.optim.schedule", "linear"],
     "error: model.optim.schedule='linear' is invalid: choose one of cosine, wsd, constant"),
    (["--model.config.nrom", "layernorm"], "did you mean --model.config.norm?"),
    (["--model.config.d_model", "250"], "error: model config: d_model=250 is invalid: must be divisible by n_head=4"),
    (["--model.optim.lr", "-1"], "error: optim config: lr=-1.0 is invalid: must be > 0"),
    (["--data.data_dir", "no/such/folder"], "no/such/folder is not a prepared folder (run `llmtrain prepare`)"),
])
def test_a_mistake_is_one_error_line(override, expected, tmp_path, capsys):
    code, _, err = cli(capsys, "fit", "--config", "configs/quickstart.yaml", *override,
                       "--trainer.logger.init_args.save_dir", str(tmp_path))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code in (1, 2) and len(lines) == 1 and expected in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # no run folder for a run that never started


def test_gpu_config_on_a_cpu_machine_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = cli(capsys, "fit", "--config", "configs/llama-124m.yaml")
    assert code == 1 and "error: trainer.accelerator='gpu' needs a CUDA GPU" in err and "Traceback" not in err


def test_debug_variable_keeps_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("LLMTRAIN_DEBUG", "1")
    code, _, err = cli(capsys, "fit", "--config", "configs/quickstart.yaml", "--model.config.d_model", "250")
    assert code == 1 and "ConfigError: model config: d_model=250" in err  # raised (the helper names it), not printed
    assert "error: model config" not in err


def test_only_our_validation_errors_are_shortened():
    def raise_config_error():
        raise ConfigError("model config: x=1 is invalid")

    for raiser, ours in ((raise_config_error, True), (lambda: int("x"), False), (lambda: [][0], False)):
        try:
            raiser()
        except Exception as exc:
            assert is_user_error(exc) is ours
    try:  # a user error wrapped by a library (jsonargparse wraps a dataclass's own error in its own)
        try:
            raise_config_error()
        except ConfigError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert isinstance(user_error(outer), ConfigError)


def test_schedule_keeps_the_checkpoints_length_unless_total_steps_is_set(capsys):
    weight = torch.nn.Parameter(torch.zeros(2))

    def scheduler(config: OptimConfig, total: int, steps: int = 0) -> ScheduleLR:
        s = ScheduleLR(torch.optim.AdamW([weight], lr=1.0), config, total)
        for _ in range(steps):
            s.optimizer.step()
            s.step()
        return s

    original = scheduler(OptimConfig(lr=1.0, warmup_steps=2), 10, steps=5)
    saved = original.state_dict()
    original.optimizer.step()
    original.step()
    resumed = scheduler(OptimConfig(lr=1.0, warmup_steps=2), 20)  # trainer.max_steps raised to 20
    resumed.load_state_dict(saved)
    resumed.optimizer.step()
    resumed.step()
    assert resumed.get_last_lr() == original.get_last_lr()
    assert "keeping the checkpoint's length of 10 steps" in capsys.readouterr().err
    asked = scheduler(OptimConfig(lr=1.0, warmup_steps=2, total_steps=20), 20)
    asked.load_state_dict(saved)
    assert asked.lr_lambdas[0].total_steps == 20
    assert "length changed from the checkpoint's 10 steps to 20" in capsys.readouterr().err


def run_config(folder: Path, shards: Path, steps: int) -> Path:
    """The tiny quickstart with its schedule length from trainer.max_steps, and the progress bar on."""
    path = tiny_config(folder, shards, steps, every_n_steps=steps)
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(enable_progress_bar=True, log_every_n_steps=1, val_check_interval=4)
    config["trainer"]["logger"]["init_args"].update(save_dir=str(folder / "runs"), name="t")
    config["model"]["optim"].update(total_steps=None, lr=1e-2, min_lr_ratio=0.1)
    path.write_text(yaml.safe_dump(config))
    return path


def test_progress_resume_of_a_finished_run_and_extension(prepared_corpus, tmp_path, capsys):
    config = run_config(tmp_path, prepared_corpus["shards"], steps=6)
    code, out, err = cli(capsys, "fit", "--config", str(config))
    assert code == 0, err[-3000:]
    # Not a terminal (captured): one line every log_every_n_steps steps, and after each validation.
    assert "step 2/6 (33%) | loss " in out and "tok/s" in out and "step 6/6 (100%)" in out, out
    assert "step 4 validation: val/bpb" in out and "val/loss" in out

    code, out, err = cli(capsys, "fit", "--config", str(config), "--ckpt_path", "last")
    assert code == 0 and "nothing to train" in err and "is at step 6 and trainer.max_steps is 6" in err, err[-3000:]
    assert "--trainer.max_steps 12" in err

    code, out, err = cli(capsys, "fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "8")
    assert code == 0 and "keeping the checkpoint's length of 6 steps" in err, err[-3000:]
    assert "training to step 8, resuming at step 6" in out
    # The reference: one uninterrupted run of 8 steps planned with a 6-step schedule.
    code, _, err = cli(capsys, "fit", "--config", str(config), "--trainer.max_steps", "8", "--model.optim.total_steps",
                       "6", "--trainer.logger.init_args.name", "straight")
    assert code == 0, err[-3000:]
    resumed, straight = (read_scalars(tmp_path / "runs" / name) for name in ("t", "straight"))
    # Past the end of the 6-step cosine the LR stays at its floor, as the run was planned; re-stretched to 8 steps
    # it would have jumped back up (to 0.16 of the peak at the last step).
    assert resumed["train/lr"][6] == resumed["train/lr"][7] == pytest.approx(1e-3, rel=1e-6)
    assert resumed["train/lr"] == straight["train/lr"]
    assert resumed["train/loss"] == straight["train/loss"]  # every step, bit for bit: the resume is exact


def test_a_fit_that_fails_at_setup_leaves_no_run_folder(prepared_corpus, tmp_path, capsys):
    config = run_config(tmp_path, prepared_corpus["shards"], steps=2)
    code, _, err = cli(capsys, "fit", "--config", str(config), "--model.config.vocab_size", "300")
    assert code == 1 and "error: vocab size mismatch" in err and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "runs").exists()


def test_progress_bar_on_a_terminal_counts_optimizer_steps(prepared_corpus, tmp_path, capsys):
    config = run_config(tmp_path, prepared_corpus["shards"], steps=4)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"].append({"class_path": "llmtrain.callbacks.StepProgress",
                                             "init_args": {"terminal": True}})
    config.write_text(yaml.safe_dump(settings))
    code, out, err = cli(capsys, "fit", "--config", str(config), "--data.global_batch_size", "8")
    assert code == 0, err[-3000:]
    frames = out.replace("\r", "\n")
    # Two micro-batches per step (global batch 8 of micro-batches of 4): the bar counts steps, not batches.
    assert "step: 100%" in frames and "4/4" in frames and "8/4" not in frames and "tok/s=" in frames, frames[-2000:]
    assert "Epoch" not in frames


def test_only_a_run_folder_of_setup_files_is_removed_and_never_a_neighbour(tmp_path):
    created = tmp_path / "runs"
    run = created / "sweep" / "a"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "events.out.tfevents.1.host").write_bytes(b"")
    (created / "b").mkdir()
    (created / "b" / "config.yaml").write_text("a run starting beside it\n")
    _remove_empty_run(run, created)
    assert not (created / "sweep").exists() and (created / "b" / "config.yaml").exists()
    kept = created / "c"
    kept.mkdir()
    (kept / "notes.txt").write_text("not written by setup\n")
    _remove_empty_run(kept, created)
    assert (kept / "notes.txt").exists()


def test_slurm_tests_are_skipped_naming_the_install_and_install_nothing(monkeypatch):
    from tests.launch import conftest as slurm

    def refuse(*args, **kwargs):
        raise AssertionError(f"the test set-up ran {args[0] if args else kwargs}")

    monkeypatch.setattr(slurm, "DAEMONS", ("slurmctld-that-is-not-installed",))
    monkeypatch.setattr(slurm.subprocess, "run", refuse)
    reason = slurm.slurm_unavailable()
    assert "SLURM is not installed (missing: slurmctld-that-is-not-installed)" in reason
    assert "apt-get update && apt-get install -y slurm-wlm munge" in reason
