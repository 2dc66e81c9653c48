"""What each stability callback's work costs on the steps it monitors, callback by callback: a real Lightning fit of
a config's model shape on random tokens (compile off: only the callbacks are timed), the monitors every other
step, each callback hook timed between two device syncs. stability_overhead.py measures the whole cost inside a
real run; this says which callback it comes from (docs/stability.md). Due on the same step, LogitMonitor and
AttentionMonitor share one probe forward, run in LogitMonitor's hook (the first in the list): its row holds both.

    python benchmarks/monitor_cost.py --configs configs/llama-124m.yaml configs/llama-350m.yaml --out $OUT
    python benchmarks/monitor_cost.py --tiny      # CPU smoke test: its times say nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmtrain.callbacks import AttentionMonitor, LogitMonitor, SpikeDetector, WeightMonitor  # noqa: E402
from llmtrain.config_files import resolved_config  # noqa: E402
from llmtrain.model import ModelConfig  # noqa: E402
from llmtrain.training.module import LanguageModel  # noqa: E402
from llmtrain.training.optim import OptimConfig  # noqa: E402
from llmtrain.training.step_log import log_step  # noqa: E402

HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
TINY = {"model": {"config": {"vocab_size": 320, "d_model": 64, "n_layer": 2, "n_head": 2, "max_seq_len": 64}},
        "data": {"micro_batch_size": 4, "seq_len": 64}}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_hooks(name: str, callback: pl.Callback, records: dict[tuple[str, bool], list[float]], every: int) -> None:
    """Wraps the callback's own hooks (those it overrides) so each call's time, between device syncs, lands in
    records[(name, whether the step is monitored)]."""
    for hook in HOOKS:
        if getattr(type(callback), hook) is getattr(pl.Callback, hook):
            continue

        def timed(trainer: pl.Trainer, *args: Any, _fn: Callable = getattr(callback, hook), **kwargs: Any) -> Any:
            monitored = log_step(trainer) % every == 0
            sync()
            start = time.perf_counter()
            out = _fn(trainer, *args, **kwargs)
            sync()
            records[(name, monitored)].append(time.perf_counter() - start)
            return out

        setattr(callback, hook, timed)


def measure(config: dict, steps: int, every: int, runs: Path) -> dict[str, dict[str, float]]:
    model_config = ModelConfig(**config["model"]["config"])
    batch, seq = config["data"]["micro_batch_size"], config["data"]["seq_len"]
    cuda = torch.cuda.is_available()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (x := torch.randint(0, model_config.vocab_size, (batch, seq), generator=g)),
                "labels": x.roll(-1, dims=1)} for _ in range(steps)]
    callbacks = {"LogitMonitor": LogitMonitor(every, 2), "AttentionMonitor": AttentionMonitor(every, 2),
                 "WeightMonitor": WeightMonitor(every), "SpikeDetector": SpikeDetector("skip_step")}
    records: dict[tuple[str, bool], list[float]] = defaultdict(list)
    for name, callback in callbacks.items():
        time_hooks(name, callback, records, every)
    module = LanguageModel(model_config, OptimConfig(lr=3e-4, warmup_steps=1, total_steps=steps))
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                         max_steps=steps, callbacks=list(callbacks.values()),
                         logger=TensorBoardLogger(runs, name="monitor_cost", default_hp_metric=False),
                         enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                         log_every_n_steps=10)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    result = {}
    for name in callbacks:
        # The first monitored steps pay the allocator's first large blocks: leave out the first two
        monitored, plain = records[(name, True)], records[(name, False)]
        result[name] = {"monitored_ms": 1e3 * statistics.median(monitored[2:] or monitored),
                        "unmonitored_ms": 1e3 * statistics.median(plain) if plain else 0.0}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/llama-124m.yaml", "configs/llama-350m.yaml"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=2, help="monitor interval of the timed fit")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test at a toy size")
    parser.add_argument("--out", type=Path, default=Path("benchmark_out/monitor_cost"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    configs = {"tiny": TINY} if args.tiny else {Path(c).stem: resolved_config(c) for c in args.configs}
    rows = ["| config | callback | monitored step (ms) | other steps (ms) |", "|---|---|---|---|"]
    results = {}
    for stem, config in configs.items():
        results[stem] = measure(config, args.steps, args.every, args.out / "runs")
        for name, times in results[stem].items():
            rows.append(f"| {stem} | {name} | {times['monitored_ms']:.1f} | {times['unmonitored_ms']:.2f} |")
        total = sum(t["monitored_ms"] for t in results[stem].values())
        rows.append(f"| **{stem}** | all four | **{total:.1f}** | |")
    table = "\n".join(rows)
    print(table)
    (args.out / "monitor_cost.md").write_text(table + "\n")
    (args.out / "monitor_cost.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
