"""Cost of the stability callbacks: the same short `llmtrain fit` with and without them; and, with --parity, the
values they log under the plain strategy and DeepSpeed ZeRO-1/2/3.

Run through the device tool (docs/stability.md has the exact commands), e.g.:
    python benchmarks/stability_overhead.py --data_dir .gpu_data/shards \
        --configs configs/llama-124m.yaml configs/llama-350m.yaml --steps 300 --out $OUT
    python benchmarks/stability_overhead.py --data_dir .gpu_data/shards --parity --steps 60 --out $OUT
CPU smoke test at a tiny size (makes its own corpus):
    python benchmarks/stability_overhead.py --tiny --out /tmp/stability_overhead

Overhead: every run is a real `llmtrain fit` in a subprocess, from the same seed and data, with the config's
default callback intervals, validation and checkpoint saving off. Step time comes from Throughput's tokens/s
windows after --skip_steps (compile and allocator warm-up): mean step time = tokens per step * mean(1 / tokens/s),
so every window weighs the same whether or not it holds a monitored step. Runs alternate with/without
--repeats times; the table gives each pair and the median ratio.

Two runs differ by run-to-run noise (~1% on a GPU) as large as the effect, so the cost is also split within one
run, where that noise cannot enter: the monitored step's cost is the excess of the windows that hold a monitored
step (and the window after, where work the host queued ahead lands) over the median of the other windows of the
same run, and at interval N its share is cost / (N * median step). The rest, the per-step cost (SpikeDetector,
the shared gradient norm), is the with/without ratio of the unmonitored windows' medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from llmtrain.events import read_scalars  # noqa: E402
from llmtrain.config_files import resolved_config  # noqa: E402

STABILITY_CALLBACKS = ("LogitMonitor", "AttentionMonitor", "WeightMonitor", "SpikeDetector")
MONITORS = STABILITY_CALLBACKS[:3]
ZERO_CONFIGS = {"ZeRO-1": "configs/deepspeed/zero1.yaml", "ZeRO-2": "configs/deepspeed/zero2.yaml",
                "ZeRO-3": "configs/deepspeed/zero3.yaml"}
# The tiny CPU size: a model and corpus that train in seconds.
TINY_MODEL = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
              "--model.config.vocab_size", "320", "--model.config.d_model", "64", "--model.config.n_layer", "2",
              "--model.config.n_head", "2", "--model.config.max_seq_len", "64", "--model.compile", "off",
              "--data.seq_len", "64", "--data.micro_batch_size", "8", "--data.global_batch_size", "8",
              "--data.num_workers", "0"]
TINY_WORDS = ("the king queen lord lady sword crown night day love death fair foul speak hear thou thee thy doth "
              "hath shall will not what where when why how good ill sweet sour heaven earth fire water").split()


def callback_name(entry: dict) -> str:
    return entry["class_path"].rsplit(".", 1)[-1]


def write_config(source: str, out: Path, stability: bool, every: Optional[int], steps: int,
                 spike_action: Optional[str] = None, spike_warmup: Optional[int] = None) -> Path:
    """`source` with (or without) the stability callbacks, monitors every `every` steps if given, checkpoints
    only at the end, Throughput windows of 10 steps."""
    config = resolved_config(REPO / source)
    callbacks = []
    for entry in config["trainer"].get("callbacks") or []:
        name = callback_name(entry)
        entry.setdefault("init_args", {})
        if name in STABILITY_CALLBACKS and not stability:
            continue
        if name in MONITORS and every is not None:
            entry["init_args"]["every_n_steps"] = every
        if name == "SpikeDetector" and spike_action is not None:
            entry["init_args"]["action"] = spike_action
        if name == "SpikeDetector" and spike_warmup is not None:
            entry["init_args"]["warmup_steps"] = spike_warmup
        if name == "PeriodicCheckpoint":
            entry["init_args"].update(every_n_steps=steps, every_minutes=None)
        if name == "Throughput":
            entry["init_args"].update(window=10, warmup_steps=2)
        callbacks.append(entry)
    if stability and not any(callback_name(e) in STABILITY_CALLBACKS for e in callbacks):
        raise SystemExit(f"{source} has no stability callbacks under trainer.callbacks")
    config["trainer"]["callbacks"] = callbacks
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def llmtrain(args: list[str], log: Path) -> float:
    """Runs `llmtrain ARGS` (output appended to `log`); returns its wall time; exits on failure."""
    cmd = [sys.executable, "-m", "llmtrain.cli", *args]
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"llmtrain {args[0]} failed with exit code {code}; see {log}")
    return time.time() - start


def fit_args(config: Path, name: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), *extra,
            "--trainer.max_steps", str(args.steps), "--model.optim.total_steps", str(args.steps),
            "--model.optim.warmup_steps", str(min(20, args.steps // 4)), "--trainer.limit_val_batches", "0",
            "--trainer.log_every_n_steps", "10", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(args.runs), "--trainer.logger.init_args.name", name,
            "--data.data_dir", args.data_dir, *(["--model.config.vocab_size", str(args.vocab_size)]
                                                 if args.vocab_size else []),
            *(TINY_MODEL if args.tiny else [])]


def tiny_corpus(root: Path, log: Path) -> str:
    """A small synthetic corpus, a 320-token tokenizer and prepared shards under `root`; returns the shard folder."""
    import random

    shards = root / "shards"
    if (shards / "metadata.json").is_file():
        return str(shards)
    rng = random.Random(0)
    texts = root / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    for part in range(4):
        docs = ["\n".join(" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                          for _ in range(rng.randint(2, 8))) for _ in range(150)]
        (texts / f"part{part}.txt").write_text("\n\n".join(docs) + "\n")
    llmtrain(["tokenizer", "train", "--input", str(texts), "--vocab_size", "320", "--output", str(root / "tok")], log)
    llmtrain(["prepare", "--source", str(texts), "--tokenizer", str(root / "tok"), "--output", str(shards),
              "--val_fraction", "0.05"], log)
    return str(shards)


def window_times(run_dir: Path, skip_steps: int, tokens_per_step: int) -> dict[int, float]:
    """Seconds per step of each Throughput window after skip_steps, by the step it was logged at."""
    tps = read_scalars(run_dir).get("train/tokens_per_sec", {})
    windows = {s: tokens_per_step / v for s, v in sorted(tps.items()) if s > skip_steps}
    if not windows:
        raise SystemExit(f"{run_dir}: no train/tokens_per_sec window after step {skip_steps}; run more --steps")
    return windows


def monitored_windows(steps: list[int], length: int, every: int) -> tuple[set[int], int]:
    """The windows (by logged step, sorted) that hold a monitored step, with the window after each, and how many
    monitored steps they hold. A window logged at s holds steps s-length..s-1 as the callbacks count them at their
    batch start."""
    held, monitored = set(), 0
    for i, s in enumerate(steps):
        count = sum(1 for m in range(s - length, s) if m % every == 0)
        if count:
            monitored += count
            held.update(steps[i:i + 2])
    return held, monitored


def split_cost(windows: dict[int, float], every: int) -> dict[str, float]:
    """Within one run: the median unmonitored step (s), and the cost of one monitored step (s) over it."""
    steps = sorted(windows)
    length = steps[1] - steps[0] if len(steps) > 1 else 1  # steps per window
    held, monitored = monitored_windows(steps, length, every)
    plain = [t for s, t in windows.items() if s not in held]
    if not plain or not monitored:
        raise SystemExit(f"need windows with and without a monitored step (every {every}); run more --steps")
    median = statistics.median(plain)
    excess = sum((windows[s] - median) * length for s in held)
    return {"median_step": median, "monitored_cost": excess / monitored}


def tokens_per_step(config_path: Path, args: argparse.Namespace) -> int:
    config = resolved_config(config_path)
    seq = 64 if args.tiny else config["data"]["seq_len"]
    batch = 8 if args.tiny else config["data"]["micro_batch_size"]
    return seq * batch  # per device; the ratio is what matters


def monitor_interval(config_path: Path) -> int:
    """The monitors' every_n_steps (they share one in the shipped configs; the smallest otherwise)."""
    config = resolved_config(config_path)
    intervals = [entry["init_args"].get("every_n_steps", 100) for entry in config["trainer"]["callbacks"]
                 if callback_name(entry) in MONITORS]
    return min(intervals)


def overhead(args: argparse.Namespace, log: Path) -> str:
    rows = ["| config | pair | step time without (ms) | step time with (ms) | overhead (pair) | monitored step "
            "(ms, within run) | its share at every_n_steps | per-step part (unmonitored windows) | overhead "
            "(split) |", "|---|---|---|---|---|---|---|---|---|"]
    results = {}
    for source in args.configs:
        stem = Path(source).stem
        with_cfg = write_config(source, args.out / f"{stem}_with.yaml", True, args.every, args.steps)
        without_cfg = write_config(source, args.out / f"{stem}_without.yaml", False, None, args.steps)
        every = monitor_interval(with_cfg)
        pairs = []
        for r in range(args.repeats):
            order = [("with", with_cfg), ("without", without_cfg)]
            windows = {}
            for variant, cfg in (order if r % 2 == 0 else order[::-1]):
                name = f"{stem}_{variant}_{r}"
                llmtrain(fit_args(cfg, name, args), log)
                windows[variant] = window_times(args.runs / name, args.skip_steps, tokens_per_step(cfg, args))
            pairs.append(pair_row(windows["with"], windows["without"], every))
            rows.append(f"| {stem} | {r} | " + " | ".join(pairs[-1]["cells"]) + " |")
        pair = statistics.median(p["pair"] for p in pairs)
        split = statistics.median(p["split"] for p in pairs)
        results[stem] = {"every_n_steps": every, "pairs": [{k: v for k, v in p.items() if k != "cells"}
                                                            for p in pairs],
                         "median_overhead_percent": 100 * pair, "median_split_overhead_percent": 100 * split}
        rows.append(f"| **{stem}** | median | | | **{100 * pair:+.2f}%** | | | | **{100 * split:+.2f}%** |")
    (args.out / "stability_overhead.json").write_text(json.dumps(results, indent=2))
    return "\n".join(rows)


def pair_row(with_windows: dict[int, float], without_windows: dict[int, float], every: int) -> dict:
    """One with/without pair: the plain ratio of mean step times, and the split estimate (the monitored step's
    within-run cost at the interval, plus the per-step part from the unmonitored windows' medians)."""
    mean_with, mean_without = statistics.fmean(with_windows.values()), statistics.fmean(without_windows.values())
    cost = split_cost(with_windows, every)
    share = cost["monitored_cost"] / (every * cost["median_step"])
    per_step = cost["median_step"] / statistics.median(without_windows.values()) - 1
    pair = mean_with / mean_without - 1
    cells = [f"{mean_without * 1e3:.1f}", f"{mean_with * 1e3:.1f}", f"{100 * pair:+.2f}%",
             f"{cost['monitored_cost'] * 1e3:.0f}", f"{100 * share:.2f}% (every {every})",
             f"{100 * per_step:+.2f}%", f"{100 * (share + per_step):+.2f}%"]
    return {"pair": pair, "monitored_cost_s": cost["monitored_cost"], "share": share, "per_step": per_step,
            "split": share + per_step, "cells": cells}


def parity(args: argparse.Namespace, log: Path) -> str:
    """The stability values of the same run under the plain strategy and ZeRO-1/2/3 (monitors every step), beside
    a second plain run: GPU runs are not bitwise reproducible and part from step ~15 on, so the plain rerun is the
    noise floor the strategies are read against. Per tag family and run: the worst tensor's relative difference at
    the first monitored step (same weights, before any drift), its median over the steps, and its maximum."""
    source = args.configs[0]
    cfg = write_config(source, args.out / "parity.yaml", True, 1 if args.every is None else args.every, args.steps,
                       spike_action="log")
    devices = ["--trainer.devices", str(args.devices)]
    plain = ["--trainer.strategy", "ddp"] if args.devices > 1 else []
    reference_name = "plain" if not plain else "DDP"
    runs = {reference_name: plain, f"{reference_name} again": plain}
    runs.update({name: ["--config", path] for name, path in ZERO_CONFIGS.items()})
    scalars = {}
    for name, extra in runs.items():
        run = f"parity_{name.replace(' ', '_')}"
        llmtrain(fit_args(cfg, run, args, *extra, *devices), log)
        scalars[name] = {tag: series for tag, series in read_scalars(args.runs / run).items()
                         if tag.startswith("stability/")}
    (args.out / "stability_parity_values.json").write_text(json.dumps(scalars))
    return parity_table(scalars, reference_name)


def parity_table(scalars: dict[str, dict[str, dict[int, float]]], reference_name: str) -> str:
    """One row per logit / spike tag and per per-layer or per-parameter family; cells 'first / median / max' of
    the worst tag's |a - b| / max(|a|, |b|, 1e-6) per step, against the reference run."""
    reference = scalars[reference_name]
    others = [name for name in scalars if name != reference_name]
    families = sorted({tag if tag.split("/")[1] in ("logits", "spike") else "/".join(tag.split("/")[:2])
                       for tag in reference if tag != "stability/spike/events"})
    rows = ["| tag (family) | " + " | ".join(f"{n} vs {reference_name}" for n in others) + " |",
            "|---|" + "---|" * len(others)]
    for family in families:
        cells = []
        for name in others:
            worst: dict[int, float] = {}
            for tag, series in reference.items():
                if tag != family and not tag.startswith(family + "/"):
                    continue
                for step, a in series.items():
                    b = scalars[name].get(tag, {}).get(step)
                    if b is not None:
                        worst[step] = max(worst.get(step, 0.0), abs(a - b) / max(abs(a), abs(b), 1e-6))
            if not worst:
                cells.append("missing")
                continue
            steps = sorted(worst)
            cells.append(f"{worst[steps[0]]:.1e} / {statistics.median(worst.values()):.1e} / "
                         f"{max(worst.values()):.1e}")
        rows.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None,
                        help="configs to measure (default: llama-124m and llama-350m; quickstart with --tiny)")
    parser.add_argument("--data_dir", default=None, help="prepared shards (made under --out with --tiny)")
    parser.add_argument("--vocab_size", type=int, default=None, help="model vocab size (the shards' tokenizer)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip_steps", type=int, default=50, help="warm-up steps left out of the step time")
    parser.add_argument("--every", type=int, default=None, help="monitor interval (default: the config's)")
    parser.add_argument("--repeats", type=int, default=1, help="with/without pairs per config")
    parser.add_argument("--parity", action="store_true", help="compare values across strategies instead")
    parser.add_argument("--devices", type=int, default=1, help="GPUs for --parity (>1: DDP vs ZeRO on N GPUs)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test at a tiny size")
    parser.add_argument("--runs", type=Path, default=None, help="run folder (default: OUT/runs)")
    parser.add_argument("--out", type=Path, default=Path("benchmark_out/stability_overhead"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs = args.runs or args.out / "runs"
    log = args.out / "log.txt"
    if args.tiny:
        if args.parity:
            raise SystemExit("--parity needs GPUs (DeepSpeed); it has no --tiny form")
        args.configs = args.configs or ["configs/quickstart.yaml"]
        args.data_dir = args.data_dir or tiny_corpus(args.out / "tiny_data", log)
        args.vocab_size = args.vocab_size or 320
        if args.steps == 300 and args.skip_steps == 50:
            args.steps, args.skip_steps = 40, 10
        args.every = args.every or 10
    args.configs = args.configs or ["configs/llama-124m.yaml", "configs/llama-350m.yaml"]
    if args.data_dir is None:
        raise SystemExit("give --data_dir (prepared shards), or --tiny")
    table = parity(args, log) if args.parity else overhead(args, log)
    print(table)
    (args.out / ("stability_parity.md" if args.parity else "stability_overhead.md")).write_text(table + "\n")


if __name__ == "__main__":
    main()
