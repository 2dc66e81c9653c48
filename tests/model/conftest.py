"""Shared fixtures for the model tests: tiny configs that run in milliseconds on CPU."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from llmtrain.model import attention
from llmtrain.model.config import ModelConfig

TINY: dict[str, Any] = dict(vocab_size=64, max_seq_len=32, d_model=32, n_layer=2, n_head=4, ffn_multiple_of=16)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny: a second intra-op thread only adds OpenMP spin-waiting, which costs 2-3x wall
    time when other processes load the cores. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny() -> Callable[..., ModelConfig]:
    """tiny(**overrides): d_model 32, 2 layers, 4 heads of 8, vocab 64, max_seq_len 32; Llama defaults otherwise."""
    return lambda **overrides: ModelConfig(**{**TINY, **overrides})


@pytest.fixture
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the flex backend through flex_attention's unfused reference instead of torch.compile: the same
    BlockMask and score_mod, without a ~20 s CPU compile. Forward only: flex has no CPU backward."""

    def unfused(*args: Any, **kwargs: Any) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "compiled_flex_attention", lambda: unfused)


@pytest.fixture
def packed() -> tuple[torch.Tensor, torch.Tensor]:
    """document_ids and restarting position_ids (2, 16): row 0 packs documents of 5, 7 and 4 tokens, row 1 is
    one document."""
    lengths = [5, 7, 4]
    document_ids = torch.zeros(2, 16, dtype=torch.long)
    position_ids = torch.arange(16).repeat(2, 1)
    document_ids[0] = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    position_ids[0] = torch.cat([torch.arange(n) for n in lengths])
    return document_ids, position_ids
