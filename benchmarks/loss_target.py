"""The loss's forward and backward on bf16 logits (what the LM head gives it), three ways: eager (as under
`compile: off`), compiled with the target logit read by gather (what the compiled loss did before), and compiled as
llmtrain.training.loss does it now (a masked sum, which spares gather's backward a dense fp32 (N, V) scatter buffer;
and what `compile: blocks` now runs, where the loss used to be eager). Each in its own process, so that its peak
memory is its own: torch.cuda.max_memory_allocated on a GPU, the process's peak resident memory on CPU (which
includes torch itself, ~0.3 GiB).

    python benchmarks/loss_target.py --tokens 8192 --vocab_size 32000          # CPU
    python benchmarks/loss_target.py --tokens 131072 --vocab_size 32000        # GPU: 124M at micro-batch 64
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmtrain.training.loss import IGNORE_INDEX, cross_entropy_and_z  # noqa: E402

VARIANTS = ("eager", "compiled, gather", "compiled, masked sum")


def gather_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cross_entropy_and_z as it was: the target logit by gather, compiled or not."""
    logits, labels = logits.float().flatten(0, 1), labels.flatten()
    valid = labels != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    count = valid.sum().clamp(min=1)
    return ((lse - target) * valid).sum() / count, (lse.square() * valid).sum() / count


def measure(variant: str, tokens: int, vocab_size: int, repeats: int) -> dict:
    """Median seconds of one forward + backward after three warm-up calls (compile included), the peak memory of
    the timed calls, and the gradient's checksum."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    logits = torch.randn(1, tokens, vocab_size, dtype=torch.bfloat16, device=device, requires_grad=True)
    labels = torch.randint(0, vocab_size, (1, tokens), device=device)
    loss_fn = {"eager": cross_entropy_and_z, "compiled, gather": torch.compile(gather_loss),
               "compiled, masked sum": torch.compile(cross_entropy_and_z)}[variant]
    times = []
    for i in range(repeats + 3):
        logits.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            if i == 3:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ce, z = loss_fn(logits, labels)
        (ce + 1e-4 * z).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    return {"seconds": statistics.median(times), "peak_gib": peak / 2**30,
            "grad_sum": logits.grad.float().sum().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--_variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._variant:
        print(json.dumps(measure(args._variant, args.tokens, args.vocab_size, args.repeats)))
        return
    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--_variant", variant, "--tokens", str(args.tokens),
                              "--vocab_size", str(args.vocab_size), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.tokens} tokens x {args.vocab_size} vocab, bf16 logits, "
          f"forward + backward, median of {args.repeats}:")
    eager = results["eager"]["seconds"]
    for variant, r in results.items():
        print(f"  {variant:22s} {1e3 * r['seconds']:9.2f} ms ({eager / r['seconds']:.2f}x eager), peak "
              f"{r['peak_gib']:.2f} GiB, gradient sum {r['grad_sum']:.6e}")


if __name__ == "__main__":
    main()
