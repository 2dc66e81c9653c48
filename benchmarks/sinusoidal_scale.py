"""CPU check of SinusoidalPosition's scale: a small decoder on the same batches with RoPE, with the sinusoids at the
token embedding's RMS (the code now), and with the unscaled table (the code before 2026-12-01).

    python benchmarks/sinusoidal_scale.py --data_dir .abl_data/shards     # ~4 min on 2 CPU cores

Plain torch (no Lightning): d_model 128, 4 layers, 4 heads, sequence 128, batch 16, AdamW lr 3e-3 (20 warmup steps),
clipping 1.0, 200 steps; prints the mean training loss of the last 50 steps per variant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmtrain.data.shards import read_metadata  # noqa: E402
from llmtrain.model import Decoder, ModelConfig  # noqa: E402

SEQ, BATCH, STEPS, LR, WARMUP = 128, 16, 200, 3e-3, 20


def train(tokens: np.ndarray, vocab: int, position: str, unscaled: bool, starts: np.ndarray) -> float:
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=vocab, d_model=128, n_layer=4, n_head=4, max_seq_len=SEQ,
                                position=position))
    if unscaled:
        model.position.scale = 1.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        batch = torch.from_numpy(np.stack([tokens[s:s + SEQ + 1] for s in starts[step]]).astype(np.int64))
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses[-50:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, required=True, help="token shards (llmtrain prepare)")
    args = parser.parse_args()
    meta = read_metadata(args.data_dir)
    shard = meta["splits"]["train"]["shards"][0]["file"]
    dtype = np.uint16 if meta["settings"]["vocab_size"] < 65536 else np.uint32
    tokens = np.memmap(args.data_dir / shard, dtype=dtype, mode="r")
    starts = np.random.default_rng(0).integers(0, len(tokens) - SEQ - 1, size=(STEPS, BATCH))
    torch.set_num_threads(2)
    for name, position, unscaled in (("rope", "rope", False), ("sinusoidal, scaled (now)", "sinusoidal", False),
                                     ("sinusoidal, unscaled (before)", "sinusoidal", True)):
        start = time.time()
        loss = train(tokens, meta["settings"]["vocab_size"], position, unscaled, starts)
        print(f"{name:32s} {loss:.3f}   ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
