"""The compiled loss's forward and backward, with the target logit read by gather (what the loss did before) and by
the masked sum it now uses under torch.compile (llmtrain.training.loss._target_logits). Same values and gradients;
the masked sum spares gather's backward a dense fp32 (N, V) scatter buffer. docs/benchmarks.md.

    python benchmarks/loss_target.py --tokens 4096 --vocab_size 32000          # CPU
    python benchmarks/loss_target.py --tokens 131072 --vocab_size 32000       # GPU: 124M at micro-batch 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmtrain.training.loss import IGNORE_INDEX, cross_entropy_and_z  # noqa: E402


def gather_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cross_entropy_and_z as it was: the target logit by gather, compiled or not."""
    logits, labels = logits.float().flatten(0, 1), labels.flatten()
    valid = labels != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    count = valid.sum().clamp(min=1)
    return ((lse - target) * valid).sum() / count, (lse.square() * valid).sum() / count


def time_step(loss_fn, logits: torch.Tensor, labels: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of one compiled forward + backward, and the gradient of the last one."""
    compiled = torch.compile(loss_fn)
    x = logits.clone().requires_grad_()
    times = []
    for i in range(repeats + 3):  # the first three: compile and warm-up
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        ce, z = compiled(x, labels)
        (ce + 1e-4 * z).backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times), x.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    logits = torch.randn(1, args.tokens, args.vocab_size, dtype=torch.bfloat16, device=device)
    labels = torch.randint(0, args.vocab_size, (1, args.tokens), device=device)
    old, old_grad = time_step(gather_loss, logits, labels, args.repeats)
    new, new_grad = time_step(cross_entropy_and_z, logits, labels, args.repeats)
    same = torch.equal(old_grad, new_grad)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.tokens} tokens x {args.vocab_size} vocab, bf16 logits, "
          f"median of {args.repeats}: gather {1e3 * old:.2f} ms, masked sum {1e3 * new:.2f} ms "
          f"({old / new:.2f}x); gradients equal: {same}")


if __name__ == "__main__":
    main()
