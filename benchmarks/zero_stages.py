"""One GPU: the same run under the plain strategy and DeepSpeed ZeRO 1/2/3; loss parity, memory, speed, resume.

Run through the device tool (see docs/benchmarks.md for the exact command), e.g.:
    python benchmarks/zero_stages.py --data_dir .gpu_data/shards --steps 200 --out $OUT
Every run is a real `llmtrain fit` in a subprocess, from the same seed and data. Prints one markdown table
and writes it, with the per-step losses, to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmtrain.events import read_scalars  # noqa: E402

STRATEGIES = {
    "single device": [],
    "ZeRO-1": ["--config", "configs/deepspeed/zero1.yaml"],
    "ZeRO-2": ["--config", "configs/deepspeed/zero2.yaml"],
    "ZeRO-3": ["--config", "configs/deepspeed/zero3.yaml"],
    # The parity questions of docs/benchmarks.md: is ZeRO-2's gap run-to-run noise (a second identical run), or
    # stage 2's overlapped reduction (overlap_comm off)?
    "ZeRO-2 again": ["--config", "configs/deepspeed/zero2.yaml"],
    "ZeRO-2 overlap_comm off": ["--config", "configs/deepspeed/zero2.yaml",
                                "--trainer.strategy.init_args.overlap_comm", "false"],
    # ZeRO-3's own spread, and compile scope apart from sharding (ZeRO-2 with ZeRO-3's `compile: blocks`): the
    # checks that found ZeRO-3's bf16 RoPE tables and its lost weight decay (docs/benchmarks.md)
    "ZeRO-3 again": ["--config", "configs/deepspeed/zero3.yaml"],
    "ZeRO-2 compile blocks": ["--config", "configs/deepspeed/zero2.yaml", "--model.compile", "blocks"],
}


def fit(name: str, extra: list[str], args: argparse.Namespace, steps: int, *more: str) -> float:
    cmd = [sys.executable, "-m", "llmtrain.cli", "fit", "--config", args.config, *extra,
           "--trainer.max_steps", str(steps), "--model.optim.total_steps", str(args.steps),
           "--model.optim.warmup_steps", str(min(20, args.steps // 2)), "--trainer.val_check_interval", str(args.steps),
           "--trainer.limit_val_batches", "10", "--trainer.log_every_n_steps", "1",
           "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(args.runs), "--trainer.logger.init_args.name", name,
           "--trainer.callbacks", json.dumps([
               {"class_path": "llmtrain.callbacks.PeriodicCheckpoint",  # every one kept: the resume reads resume_at's
                "init_args": {"every_n_steps": args.resume_at, "keep": args.steps // args.resume_at + 1}},
               {"class_path": "llmtrain.callbacks.Throughput", "init_args": {"window": 20, "warmup_steps": 10}}]),
           "--model.config.vocab_size", str(args.vocab_size),
           "--data.data_dir", args.data_dir, "--data.micro_batch_size", str(args.micro_batch_size), *more]
    start = time.time()
    run_logged(name, cmd, args)
    return time.time() - start


def run_logged(name: str, cmd: list[str], args: argparse.Namespace) -> None:
    """Runs `cmd` with its output appended to --out/log.txt; stops the benchmark if it fails."""
    with open(Path(args.out) / "log.txt", "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{name} failed with exit code {code}; see {args.out}/log.txt")


def summary(run_dir: Path) -> dict:
    scalars = read_scalars(run_dir)
    loss = scalars["train/loss"]
    tps = scalars.get("train/tokens_per_sec", {})
    mem = scalars.get("train/gpu_mem_peak_gib", {})
    return {"loss": loss, "tokens_per_sec": max(tps.values()) if tps else float("nan"),
            "peak_gib": max(mem.values()) if mem else float("nan"),
            "val_loss": list(scalars.get("val/loss", {0: float("nan")}).values())[-1]}


def resumed_run(stage: str, args: argparse.Namespace, straight: dict[int, float]) -> dict:
    """Resumes the uninterrupted run's own step-`resume_at` checkpoint (as saved, or converted to a universal one)
    and compares the steps after it with that run. GPU runs are not bitwise reproducible: two identical ZeRO-2 runs
    part past 1e-3 relative by step 15 (docs/benchmarks.md), so a separate run stopped at `resume_at` would have
    drifted before its stop. Resuming the same checkpoint leaves only the drift after it, and the first steps show
    whether the whole state came back (a lost optimizer state or data position shows there at once)."""
    saved = Path(args.runs) / stage.replace(" ", "_") / "checkpoints" / f"step{args.resume_at:07d}.ckpt"
    tag = f"{stage}_resumed_{args.resume_via}".replace(" ", "_")
    ckpt = str(saved)
    if args.resume_via == "universal":  # what a job resumed on another number of GPUs does
        ckpt = str(Path(args.runs) / f"{tag}-step{args.resume_at}-universal.ckpt")
        run_logged("convert --universal", [sys.executable, "-m", "llmtrain.cli", "convert", "--universal",
                                           str(saved), ckpt], args)
    fit(tag, STRATEGIES[stage], args, args.steps, "--ckpt_path", ckpt)
    resumed = summary(Path(args.runs) / tag)
    after = sorted(s for s in resumed["loss"] if s >= args.resume_at and s in straight)
    rel = [abs(resumed["loss"][s] - straight[s]) / abs(straight[s]) for s in after]
    return {**resumed, "resume_first10_max_rel_diff": max(rel[:10]), "resume_max_rel_diff": max(rel)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/llama-124m.yaml")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--resume_at", type=int, default=100)
    parser.add_argument("--resume_stage", type=int, choices=[0, 1, 2, 3], default=3,
                        help="the stage whose uninterrupted run is also resumed from its --resume_at checkpoint "
                             "(0: none)")
    parser.add_argument("--resume_via", choices=["saved", "universal"], default="saved",
                        help="resume from the checkpoint as saved, or from its `llmtrain convert --universal`")
    parser.add_argument("--runs", default="runs/zero_stages")
    parser.add_argument("--out", default="benchmark_out")
    parser.add_argument("--only", nargs="*", default=None, help="subset of strategy names")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    for name, extra in STRATEGIES.items():
        if args.only and name not in args.only:
            continue
        tag = name.replace(" ", "_")  # each name its own run folder
        fit(tag, extra, args, args.steps)
        results[name] = summary(Path(args.runs) / tag)
        write_table(results, args)  # after every run: a call cut off at the time limit keeps what finished
    # The uninterrupted run resumed from its step-resume_at checkpoint (as saved, or converted to universal): the
    # loss after resuming must follow it.
    stage = f"ZeRO-{args.resume_stage}"
    if args.resume_stage and (not args.only or stage in args.only):
        results[f"{stage} resumed ({args.resume_via})"] = resumed_run(stage, args, results[stage]["loss"])
        write_table(results, args)


def write_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    """Prints and writes the table; the parity columns compare the last 50 steps' losses with the single-device
    run (or the first run of the call when it has none), where single-step noise averages out."""
    reference = results.get("single device", next(iter(results.values())))["loss"]
    lines = ["| strategy | tokens/s | peak GPU memory (GiB) | loss @ last step | mean loss, last 50 steps "
             "| mean abs diff vs reference, last 50 steps | max abs diff vs reference | val loss | resume check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        common = sorted(set(r["loss"]) & set(reference))
        tail = common[-50:]
        mean = sum(r["loss"][s] for s in tail) / len(tail)
        mean_diff = sum(abs(r["loss"][s] - reference[s]) for s in tail) / len(tail)
        max_diff = max(abs(r["loss"][s] - reference[s]) for s in common)
        resume = (f"max rel diff {r['resume_first10_max_rel_diff']:.2e} over the first 10 steps after "
                  f"{args.resume_at}, {r['resume_max_rel_diff']:.2e} over all" if "resume_max_rel_diff" in r else "")
        lines.append(f"| {name} | {r['tokens_per_sec']:,.0f} | {r['peak_gib']:.1f} | {r['loss'][max(r['loss'])]:.4f} "
                     f"| {mean:.4f} | {mean_diff:.4f} | {max_diff:.4f} | {r['val_loss']:.4f} | {resume} |")
    table = "\n".join(lines)
    print(table, flush=True)
    (Path(args.out) / "zero_stages.md").write_text(table + "\n")
    (Path(args.out) / "zero_stages_losses.json").write_text(json.dumps(
        {name: {str(k): v for k, v in r["loss"].items()} for name, r in results.items()}))

if __name__ == "__main__":
    main()
