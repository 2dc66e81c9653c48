"""Every shipped config parses, and bad input is refused with a message naming the field.

The CLI runs in this process (llmtrain.cli.main, what the console script calls): these commands stop before
training, and a subprocess per command cost ~6 s of imports each. tests/training/test_fit.py runs the console
script itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llmtrain.cli import main as llmtrain_main

CONFIGS = sorted(str(p) for p in Path("configs").glob("*.yaml"))


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `llmtrain ARGS`; an exception that would end the process is its message.
    sys.argv is the command's, and the environment (PL_GLOBAL_SEED, DS_ACCELERATOR) is restored after it."""
    environ, argv = dict(os.environ), sys.argv
    sys.argv = ["llmtrain", *args]
    error = ""
    try:
        code = llmtrain_main(list(args))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except Exception as exc:  # the console script would print its traceback and exit 1
        code, error = 1, f"{type(exc).__name__}: {exc}"
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
    out = capsys.readouterr()
    return code, out.out, out.err + error


@pytest.mark.parametrize("config", CONFIGS)
def test_config_resolves(config, capsys):
    code, out, _ = cli(capsys, "fit", "--config", config, "--print_config")
    assert code == 0 and "model:" in out and "trainer:" in out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs_compose_with_a_model_config(stage, capsys):
    code, out, _ = cli(capsys, "fit", "--config", "configs/llama-124m.yaml", "--config",
                       f"configs/deepspeed/zero{stage}.yaml", "--print_config")
    assert code == 0 and "llmtrain.training.strategy.ZeroStrategy" in out and f"stage: {stage}" in out


# Each switch's own validation is unit-tested in tests/model/test_config.py; these check the CLI surfaces it.
@pytest.mark.parametrize("override, words", [
    (["--model.config.norm", "batchnorm"], ["norm", "batchnorm", "rmsnorm, layernorm"]),
    (["--model.config.d_model", "250"], ["d_model", "250", "n_head"]),
    (["--model.optim.schedule", "linear"], ["schedule", "linear"]),
])
def test_invalid_model_config_is_refused_naming_the_field(override, words, tmp_path, capsys):
    code, _, err = cli(capsys, "fit", "--config", "configs/quickstart.yaml", *override, "--trainer.max_steps", "1",
                       "--trainer.logger.init_args.save_dir", str(tmp_path))
    assert code != 0
    for word in words:
        assert word in err, err[-2000:]


def test_missing_config_file_is_named(capsys):
    code, _, err = cli(capsys, "fit", "--config", "configs/does-not-exist.yaml")
    assert code != 0 and "does-not-exist.yaml" in err


def test_unknown_command_lists_the_commands(capsys):
    code, _, err = cli(capsys, "trian")
    assert code == 2 and "fit" in err and "prepare" in err
