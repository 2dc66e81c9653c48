"""Demonstration for docs/stability.md (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
training instabilities"): a small model at a learning rate too high for it, without qk-norm and z-loss, grows
its attention logits and degrades or diverges, and the SpikeDetector flags it; the same run with qk-norm and
z-loss stays stable. Then `llmtrain report` of both runs (PNG curves + summary.md).

Run through the device tool (docs/stability.md has the exact command), e.g.:
    python benchmarks/stability_demo.py --data_dir .gpu_data/shards --lrs 1e-2 3e-2 1e-1 --out $OUT
CPU smoke test at a tiny size (makes its own corpus):
    python benchmarks/stability_demo.py --tiny --out /tmp/stability_demo

Both variants of a learning rate run the same `llmtrain fit` (same seed, data, schedule) and differ only in
model.config.qk_norm and model.z_loss_coef. The SpikeDetector runs with action "log" so the whole failure is
on record; the monitors run every --every steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stability_overhead import llmtrain, tiny_corpus, write_config  # noqa: E402

from llmtrain.report import summarize_run  # noqa: E402

VARIANTS = {
    "baseline": ["--model.config.qk_norm", "false", "--model.z_loss_coef", "0"],
    "qk_norm_zloss": ["--model.config.qk_norm", "true", "--model.z_loss_coef", "1e-4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/llama-124m.yaml", help="base config (model size overridden)")
    parser.add_argument("--data_dir", default=None, help="prepared shards (made under --out with --tiny)")
    parser.add_argument("--vocab_size", type=int, default=32000, help="the shards' tokenizer vocab size")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-2], help="peak learning rates to run")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--micro_batch_size", type=int, default=32)
    parser.add_argument("--every", type=int, default=10, help="monitor interval")
    parser.add_argument("--spike_warmup", type=int, default=50, help="SpikeDetector warmup_steps")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test at a tiny size")
    parser.add_argument("--out", type=Path, default=Path("benchmark_out/stability_demo"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    hardware = []
    if args.tiny:
        args.config = "configs/quickstart.yaml"
        args.data_dir = args.data_dir or tiny_corpus(args.out / "tiny_data", log)
        args.vocab_size = 320
        for name, value in (("steps", 40), ("warmup_steps", 4), ("d_model", 64), ("n_layer", 2), ("n_head", 2),
                            ("seq_len", 64), ("micro_batch_size", 8), ("every", 5), ("spike_warmup", 10)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        hardware = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
                    "--data.num_workers", "0"]
    if args.data_dir is None:
        raise SystemExit("give --data_dir (prepared shards), or --tiny")
    config = write_config(args.config, args.out / "demo.yaml", True, args.every, args.steps, spike_action="log",
                          spike_warmup=args.spike_warmup)
    runs = args.out / "runs"
    rows = []
    for lr in args.lrs:
        names = []
        for variant, extra in VARIANTS.items():
            name = f"lr{lr:g}_{variant}"
            # Eager: at this size compiling would cost more time than it saves.
            llmtrain(["fit", "--config", str(config), *hardware, *extra, "--model.compile", "off",
                      "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(args.steps),
                      "--trainer.limit_val_batches", "10", "--trainer.log_every_n_steps", "5",
                      "--trainer.enable_progress_bar", "false",
                      "--trainer.logger.init_args.save_dir", str(runs), "--trainer.logger.init_args.name", name,
                      "--model.config.vocab_size", str(args.vocab_size), "--model.config.d_model", str(args.d_model),
                      "--model.config.n_layer", str(args.n_layer), "--model.config.n_head", str(args.n_head),
                      "--model.config.max_seq_len", str(args.seq_len), "--model.optim.lr", str(lr),
                      "--model.optim.warmup_steps", str(args.warmup_steps),
                      "--model.optim.total_steps", str(args.steps), "--data.data_dir", args.data_dir,
                      "--data.seq_len", str(args.seq_len), "--data.micro_batch_size", str(args.micro_batch_size),
                      "--data.global_batch_size", str(args.micro_batch_size)],
                     log)
            names.append(str(runs / name))
            s = summarize_run(runs / name)
            diverged = f"at step {s['diverged_at']}" if s["diverged"] else "no"
            rows.append(f"| {lr:g} | {variant} | {s['final_loss']:.4g} | {s['min_loss']:.4g} | "
                        f"{s['max_attn_logit']:.4g} | {s['max_output_logit']:.4g} | {s['spikes']} | {diverged} |")
        llmtrain(["report", *names, "--out", str(args.out / f"report_lr{lr:g}")], log)
    header = "| lr | variant | final loss | min loss | max attn logit | max output logit | spikes | diverged |"
    table = "\n".join([header, "|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    (args.out / "stability_demo.md").write_text(table + "\n")
    print(f"plots: {', '.join(str(args.out / f'report_lr{lr:g}') for lr in args.lrs)}")


if __name__ == "__main__":
    main()
