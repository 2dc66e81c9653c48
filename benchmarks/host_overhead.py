"""Host time per training step: `llmtrain`'s LightningModule and callbacks around a model too small for its compute
to matter, on CPU. What a GPU step costs the CPU that launches it: when that time nears the GPU's step time, the
GPU waits (StepProfiler's "device idle"); docs/benchmarks.md.

    python benchmarks/host_overhead.py --callbacks none stability --steps 300 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmtrain.callbacks import AttentionMonitor, LogitMonitor, SpikeDetector, Throughput, WeightMonitor  # noqa: E402
from llmtrain.model import ModelConfig  # noqa: E402
from llmtrain.training.module import LanguageModel  # noqa: E402
from llmtrain.training.optim import OptimConfig  # noqa: E402

CONFIG = ModelConfig(vocab_size=64, max_seq_len=8, d_model=16, n_layer=2, n_head=2)
CALLBACKS = {  # as configs/llama-*.yaml set them (PeriodicCheckpoint left out: it saves nothing between its steps)
    "none": lambda: [],
    "stability": lambda: [Throughput(), LogitMonitor(), AttentionMonitor(), WeightMonitor(),
                          SpikeDetector(action="skip_step")],
}


def ms_per_step(callbacks: str, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 8), generator=g), "labels": torch.randint(0, 64, (2, 8), generator=g)}
               for _ in range(steps)]
    module = LanguageModel(CONFIG, OptimConfig(lr=1e-3, warmup_steps=1, total_steps=steps))
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=CALLBACKS[callbacks](), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0, log_every_n_steps=10)
    start = time.perf_counter()
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callbacks", nargs="+", default=list(CALLBACKS), choices=list(CALLBACKS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for callbacks in args.callbacks:
        ms_per_step(callbacks, 20)  # warm-up: imports, first-call dispatch
        runs = [ms_per_step(callbacks, args.steps) for _ in range(args.repeats)]
        print(f"callbacks={callbacks}: {statistics.median(runs):.2f} ms/step host time (median of "
              f"{', '.join(f'{r:.2f}' for r in runs)})")


if __name__ == "__main__":
    main()
