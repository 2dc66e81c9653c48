"""Config files that build on another: a top-level `base: other.yaml` (a path relative to the file) means "that file's
settings, then mine", so the llama-*.yaml configs state only what differs from configs/llama-base.yaml.

Merging: mappings merge key by key (the later file wins), lists and values are replaced whole; a mapping with another
`class_path` than the base's replaces it whole (its init_args belong to another class). Every reader of a config
file goes through resolved_config: `llmtrain fit --config` (expand_config_arguments hands LightningCLI one resolved
file), `llmtrain submit` and the benchmarks.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml

BASE_KEY = "base"


class ConfigFileError(ValueError):
    """A config file that cannot be read or resolved; the message names the file."""


def resolved_config(path: str | os.PathLike[str], _chain: Optional[list[Path]] = None) -> dict[str, Any]:
    """The settings of config file `path` with its `base` chain applied."""
    path = Path(path)
    chain = [*(_chain or []), path.resolve()]
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigFileError(f"config file {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigFileError(f"config file {path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path}: holds a {type(data).__name__}, not a mapping of settings")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigFileError(f"config file {path}: {BASE_KEY}={base!r} must be the path of another config file")
    base_path = path.parent / base
    if base_path.resolve() in chain:
        raise ConfigFileError(f"config file {path}: {BASE_KEY}={base!r} makes a cycle "
                              f"({' -> '.join(str(p) for p in [*chain, base_path.resolve()])})")
    return merged(resolved_config(base_path, chain), data)


def merged(base: Any, override: Any) -> Any:
    """`override` applied on `base` (module docstring)."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    if "class_path" in override and override["class_path"] != base.get("class_path"):
        return override
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if key in base else value
    return out


def expand_config_arguments(argv: list[str]) -> list[str]:
    """argv with every `--config FILE` whose file has a `base` replaced by one temporary file of the resolved
    settings (deleted at exit); other arguments, and config files without a base, as they are."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += ["--config", _resolved_file(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + _resolved_file(arg.removeprefix("--config="))
        out.append(arg)
        i += 1
    return out


def _resolved_file(value: str) -> str:
    path = Path(value)
    if not path.is_file():
        return value  # not a file (a missing path, or inline YAML): LightningCLI says what is wrong
    try:
        has_base = isinstance(raw := yaml.safe_load(path.read_text()), dict) and BASE_KEY in raw
    except yaml.YAMLError:
        return value  # LightningCLI reports the YAML error, naming the file
    if not has_base:
        return value
    fd, name = tempfile.mkstemp(prefix=f"{path.stem}-resolved-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(f"# {path} with its {BASE_KEY} chain resolved (llmtrain.config_files)\n")
        yaml.safe_dump(resolved_config(path), f, sort_keys=False)
    atexit.register(lambda: Path(name).unlink(missing_ok=True))
    return name
