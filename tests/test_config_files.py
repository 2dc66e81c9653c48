"""Config files with a `base`: resolution and merging, the shipped llama configs against the code's presets, and the
CLI seeing exactly the resolved settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmtrain.config_files import ConfigFileError, expand_config_arguments, merged, resolved_config
from llmtrain.model import ConfigError, ModelConfig
from llmtrain.model.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def test_merge_is_key_by_key_lists_replaced_and_another_class_replaces_whole() -> None:
    base = {"trainer": {"max_steps": 10, "callbacks": [1, 2], "logger": {"class_path": "A", "init_args": {"x": 1, "y": 2}}}}
    override = {"trainer": {"callbacks": [3], "logger": {"init_args": {"y": 5}}}}
    assert merged(base, override) == {"trainer": {"max_steps": 10, "callbacks": [3],
                                                  "logger": {"class_path": "A", "init_args": {"x": 1, "y": 5}}}}
    assert merged(base["trainer"]["logger"], {"class_path": "B", "init_args": {"z": 0}}) == \
        {"class_path": "B", "init_args": {"z": 0}}


def test_base_is_relative_to_its_file_and_cycles_and_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("a: 1\nb: {c: 2, d: 3}\n")
    (tmp_path / "run.yaml").write_text("base: sub/base.yaml\nb: {d: 4}\n")
    assert resolved_config(tmp_path / "run.yaml") == {"a": 1, "b": {"c": 2, "d": 4}}
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ConfigFileError, match="makes a cycle"):
        resolved_config(tmp_path / "x.yaml")
    (tmp_path / "z.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigFileError, match="nowhere.yaml"):
        resolved_config(tmp_path / "z.yaml")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_llama_config_is_the_base_plus_its_preset(name: str) -> None:
    config = resolved_config(REPO / "configs" / f"{name}.yaml")
    base = resolved_config(REPO / "configs" / "llama-base.yaml")
    assert ModelConfig(**config["model"]["config"]) == ModelConfig.from_name(name, vocab_size=32000, max_seq_len=2048)
    assert config["trainer"]["callbacks"] == base["trainer"]["callbacks"]  # the shared recipe, not a copy
    assert config["trainer"]["logger"]["init_args"]["name"] == name


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="choose one of llama-124m, llama-350m, llama-1b"):
        ModelConfig.from_name("llama-7b")


def test_the_cli_gets_one_resolved_file_and_other_arguments_untouched() -> None:
    argv = ["fit", "--config", str(REPO / "configs" / "llama-124m.yaml"), "--config",
            str(REPO / "configs" / "deepspeed" / "zero2.yaml"), "--trainer.max_steps", "5"]
    expanded = expand_config_arguments(argv)
    assert expanded[3:] == argv[3:] and expanded[:2] == argv[:2]  # zero2.yaml has no base: passed as it is
    assert yaml.safe_load(Path(expanded[2]).read_text()) == resolved_config(argv[2])


def test_fit_parses_the_resolved_config_and_leaves_the_command_line_as_typed(monkeypatch, capsys) -> None:
    from llmtrain.cli import main

    argv = ["llmtrain", "fit", "--config", "configs/llama-124m.yaml", "--trainer.accelerator", "cpu", "--print_config"]
    monkeypatch.setattr("sys.argv", list(argv))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as stop:  # --print_config prints and exits 0
        main()
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["d_model"] == 768 and len(printed["trainer"]["callbacks"]) == 7
    import sys
    assert sys.argv == argv  # what a preemption's resume command is built from
