"""Every shipped config parses, and bad input is refused with a message naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import llmtrain

CONFIGS = sorted(str(p) for p in Path("configs").glob("*.yaml"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtrain.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_resolves(config):
    out = llmtrain("fit", "--config", config, "--print_config").stdout
    assert "model:" in out and "trainer:" in out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs_compose_with_a_model_config(stage):
    out = llmtrain("fit", "--config", "configs/llama-124m.yaml", "--config", f"configs/deepspeed/zero{stage}.yaml",
                   "--print_config").stdout
    assert "llmtrain.training.strategy.ZeroStrategy" in out and f"stage: {stage}" in out


# Each switch's own validation is unit-tested in tests/model/test_config.py; these check the CLI surfaces it.
@pytest.mark.parametrize("override, words", [
    (["--model.config.norm", "batchnorm"], ["norm", "batchnorm", "rmsnorm, layernorm"]),
    (["--model.config.d_model", "250"], ["d_model", "250", "n_head"]),
    (["--model.optim.schedule", "linear"], ["schedule", "linear"]),
])
def test_invalid_model_config_is_refused_naming_the_field(override, words, tmp_path):
    result = cli("fit", "--config", "configs/quickstart.yaml", *override, "--trainer.max_steps", "1",
                 "--trainer.logger.init_args.save_dir", str(tmp_path))
    assert result.returncode != 0
    for word in words:
        assert word in result.stderr, result.stderr[-2000:]


def test_missing_config_file_is_named():
    result = cli("fit", "--config", "configs/does-not-exist.yaml")
    assert result.returncode != 0 and "does-not-exist.yaml" in result.stderr


def test_unknown_command_lists_the_commands():
    result = cli("trian")
    assert result.returncode == 2 and "fit" in result.stderr and "prepare" in result.stderr
