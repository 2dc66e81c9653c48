"""Data pipeline: sources -> tokenizer -> token shards -> TokenDataModule (see DESIGN.md).

Names are imported lazily, so `import llmtrain.data.shards` (e.g. in tokenizer worker processes) does not pull
in torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Source": "sources",
    "SourceError": "sources",
    "parse_source": "sources",
    "is_validation_document": "sources",
    "Tokenizer": "tokenizer",
    "TokenizerError": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "ShardError": "shards",
    "PrepareError": "shards",
    "prepare": "shards",
    "read_metadata": "shards",
    "verify_shards": "shards",
    "TokenDataModule": "datamodule",
    "tokenizer_main": "commands",
    "prepare_main": "commands",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
