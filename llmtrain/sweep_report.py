"""The report of a sweep folder (`llmtrain report SWEEP_DIR`, folders made by `llmtrain sweep`).

summary.md holds one row per variant and learning rate, aggregated over seeds as mean ± std (sample std): final
val loss and bpb, tokens/s, peak GPU memory, wall time, max attention and output logit, and how many runs diverged
and at which steps. Each variant is compared with the baseline at the same LR: a difference is called one only when
the two mean ± std intervals do not overlap; otherwise the row says "no difference" (DESIGN.md, Experiments).
With an LR grid, the LR sensitivity of Wortsman et al. 2023 §3.1 per variant:

    LR sensitivity = mean over the LR grid of [ min(loss(lr), L_cap) - min over the grid of loss(lr) ]

where loss(lr) is the mean over seeds of the final val loss, a diverged run counts as L_cap, and L_cap = ln(vocab)
(the loss of a uniform guess, about the loss at initialisation). Plots: val loss vs tokens and vs wall time per
variant (at its best LR; band: min..max over seeds), and val loss vs LR per variant.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Callable, Optional


from llmtrain.events import read_scalars, wall_clock
from llmtrain.report import VAL_LOSS_TAG, _fmt, summarize_run


@dataclass
class RunRecord:
    """One run of the sweep: what sweep.json and result.json say, and what its events hold."""

    key: str
    variant: str
    lr: Optional[float]
    seed: int
    status: str  # finished | diverged | failed | pending
    diverged_step: Optional[int] = None
    wall_s: float = math.nan
    params: int = 0
    shape: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # report.summarize_run; empty without events
    val_loss: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, float] = field(default_factory=dict)  # step -> tokens trained on (val steps)
    wall: dict[int, float] = field(default_factory=dict)  # step -> seconds of training (val steps)


def _tokens_at(tokens: dict[int, float], step: int) -> float:
    """train/tokens at the last step at or before `step` (val is logged at the step training reached)."""
    before = [s for s in tokens if s <= step]
    if before:
        return tokens[max(before)]
    last = max(tokens)
    return tokens[last] * step / (last + 1)  # before the first logged step: the constant rate


def load_sweep(sweep_dir: Path) -> tuple[dict[str, Any], list[RunRecord]]:
    """sweep.json (or, without it, what the result.json files tell) and a record for every run, pending included."""
    manifest_path = sweep_dir / "sweep.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    results = {}
    for path in sorted(sweep_dir.glob("*/**/result.json")):
        result = json.loads(path.read_text())
        if path.parent.relative_to(sweep_dir).as_posix() == result.get("key"):  # not a set-aside attempt
            results[result["key"]] = result
    planned = manifest.get("runs") or sorted(results.values(), key=lambda r: r.get("index", 0))
    if not planned:
        raise FileNotFoundError(f"{sweep_dir}: no sweep.json and no run results: is it a sweep folder?")
    records = []
    for run in planned:
        result = results.get(run["key"], {})
        record = RunRecord(key=run["key"], variant=run["variant"], lr=run["lr"], seed=run["seed"],
                           status=result.get("status", "pending"), diverged_step=result.get("diverged_step"),
                           wall_s=result.get("wall_s", math.nan), params=run.get("params", 0),
                           shape=run.get("shape", {}))
        run_dir = sweep_dir / run["key"]
        if result and any(run_dir.glob("events.out.tfevents.*")):
            scalars = read_scalars(run_dir)
            record.summary = summarize_run(scalars)
            record.val_loss = scalars.get(VAL_LOSS_TAG, {})
            train_tokens = scalars.get("train/tokens", {})
            if train_tokens:
                record.tokens = {s: _tokens_at(train_tokens, s) for s in record.val_loss}
            record.wall = wall_clock(run_dir, VAL_LOSS_TAG)
        records.append(record)
    if not manifest:
        variants = list(dict.fromkeys(r.variant for r in records))
        manifest = {"name": sweep_dir.name, "variants": variants, "baseline": variants[0],
                    "lrs": sorted({r.lr for r in records if r.lr is not None}), "vocab_size": None}
    return manifest, records


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class Spread:
    """Mean ± sample std of the finite values over seeds (std NaN with fewer than 2)."""

    mean: float
    std: float
    n: int
    fmt: Callable[[float], str] = _fmt

    @classmethod
    def of(cls, values: list[float], fmt: Callable[[float], str] = _fmt) -> "Spread":
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, 0, fmt)
        return cls(mean(finite), stdev(finite) if len(finite) > 1 else math.nan, len(finite), fmt)

    def __str__(self) -> str:
        if self.n == 0:
            return "-"
        return self.fmt(self.mean) if self.n == 1 else f"{self.fmt(self.mean)} ± {self.fmt(self.std)}"


def _nats(value: float) -> str:
    return f"{value:.3f}"


def _thousands(value: float) -> str:
    return f"{value:,.0f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def compare(value: Spread, baseline: Spread, noise: Optional[Spread] = None) -> str:
    """"no difference" when the mean ± std intervals overlap; a difference (lower/higher) only outside them.

    With fewer than 2 seeds on a side, a measured seed noise (`noise`: one config over several seeds, e.g. the
    suite's seed_noise topic) stands in for the missing spreads: the difference of the two means has standard
    error σ·sqrt(1/n_value + 1/n_baseline) for independent seeds (paired seeds correlate, which only lowers it), and
    it counts beyond 2 of those."""
    delta = value.mean - baseline.mean
    if value.n >= 2 and baseline.n >= 2:
        if abs(delta) <= value.std + baseline.std:
            return "no difference"
        return "lower" if delta < 0 else "higher"
    if value.n == 0 or baseline.n == 0:
        return "-"
    if noise is None or noise.n < 2:
        return "n/a (needs ≥ 2 seeds each, or a seed-noise sweep)"
    z = delta / (noise.std * math.sqrt(1 / value.n + 1 / baseline.n))
    if abs(z) <= 2:
        return f"no difference ({z:+.1f}σ)"
    return f"{'lower' if delta < 0 else 'higher'} ({z:+.1f}σ)"


def seed_noise(sweep_dir: Path) -> Spread:
    """The seed spread of the final val loss in a sweep of one config over several seeds: its baseline variant's
    finished runs at its first learning rate."""
    manifest, records = load_sweep(sweep_dir)
    runs = [r for r in records if r.variant == manifest["baseline"] and r.status == "finished"]
    first_lr = min((r.lr for r in runs), key=lambda lr: (lr is not None, lr or 0.0), default=None)
    return _cell([r for r in runs if r.lr == first_lr], "final_val_loss", _nats)


def lr_sensitivity(losses: dict[float, list[float]], cap: float) -> float:
    """Wortsman et al. 2023 §3.1: mean over the LR grid of min(loss(lr), cap) - min over lr of loss(lr), where
    loss(lr) is the mean over seeds of each seed's loss capped at `cap` (NaN/inf, i.e. diverged: `cap`).
    LRs without any loss are left out."""
    per_lr = [mean(min(v, cap) if math.isfinite(v) else cap for v in values) for values in losses.values() if values]
    if not per_lr:
        return math.nan
    best = min(per_lr)
    return mean(loss - best for loss in per_lr)


def lr_losses(records: list[RunRecord], cap: float) -> dict[float, list[float]]:
    """Final val loss per LR of one variant: finished runs as logged, diverged runs as `cap`; failed and pending
    runs are not results and stay out."""
    losses: dict[float, list[float]] = {}
    for r in records:
        if r.status == "diverged":
            losses.setdefault(r.lr, []).append(cap)
        elif r.status == "finished":
            losses.setdefault(r.lr, []).append(r.summary.get("final_val_loss", math.nan))
    return losses


# ------------------------------------------------------------------------------------------------- tables


def _cell(records: list[RunRecord], key: str, fmt: Callable[[float], str] = _fmt) -> Spread:
    return Spread.of([r.summary.get(key, math.nan) for r in records if r.summary], fmt)


def sweep_table(manifest: dict[str, Any], records: list[RunRecord], noise: Optional[Spread] = None) -> str:
    lrs = sorted({r.lr for r in records}, key=lambda lr: (lr is None, lr))
    baseline = manifest["baseline"]
    lines = ["| variant | LR | runs ok | N (non-emb.) | d_model / n_layer / d_ff | final val loss | Δ vs baseline "
             "| verdict | val bpb | tokens/s | peak GPU mem (GiB) | wall (min) | max attn logit | max output logit "
             "| diverged (steps) |", "|" + "---|" * 15]
    for lr in lrs:
        base_runs = [r for r in records if r.variant == baseline and r.lr == lr and r.status == "finished"]
        base_loss = _cell(base_runs, "final_val_loss")
        for variant in manifest["variants"]:
            runs = [r for r in records if r.variant == variant and r.lr == lr]
            if not runs:
                continue
            ok = [r for r in runs if r.status == "finished"]
            loss = _cell(ok, "final_val_loss", _nats)
            if variant == baseline:
                delta, verdict = "", "baseline"
            else:
                delta = f"{loss.mean - base_loss.mean:+.3f}" if loss.n and base_loss.n else "-"
                verdict = compare(loss, base_loss, noise)
            diverged = [r for r in runs if r.status == "diverged"]
            div = f"{len(diverged)} ({', '.join(str(r.diverged_step) for r in diverged)})" if diverged else "0"
            other = [f"{sum(r.status == s for r in runs)} {s}" for s in ("failed", "pending")
                     if any(r.status == s for r in runs)]
            shape = runs[0].shape
            lines.append(
                f"| {variant} | {_fmt(lr) if lr is not None else 'base'} | {len(ok)}/{len(runs)}"
                f"{' (' + ', '.join(other) + ')' if other else ''} | {_count(runs[0].params)} "
                f"| {shape.get('d_model', '-')} / {shape.get('n_layer', '-')} / {shape.get('d_ff', '-')} "
                f"| {loss} | {delta} | {verdict} | {_cell(ok, 'final_val_bpb', _nats)} "
                f"| {_cell(ok, 'tokens_per_sec', _thousands)} "
                f"| {_cell(ok, 'gpu_mem_peak_gib')} | {Spread.of([r.wall_s / 60 for r in ok], lambda v: f'{v:.3g}')} "
                f"| {_cell(runs, 'max_attn_logit')} | {_cell(runs, 'max_output_logit')} | {div} |")
    return "\n".join(lines)


def sensitivity_table(manifest: dict[str, Any], records: list[RunRecord], cap: float) -> str:
    lines = ["| variant | LR sensitivity (nats) | best LR | loss at best LR | LRs with results | diverged runs |",
             "|---|---|---|---|---|---|"]
    for variant in manifest["variants"]:
        runs = [r for r in records if r.variant == variant]
        losses = lr_losses(runs, cap)
        if not losses:
            lines.append(f"| {variant} | - | - | - | 0/{len(manifest['lrs'])} | - |")
            continue
        per_lr = {lr: mean(min(v, cap) for v in values) for lr, values in losses.items()}
        best = min(per_lr, key=per_lr.get)
        diverged = sum(r.status == "diverged" for r in runs)
        lines.append(f"| {variant} | {lr_sensitivity(losses, cap):.4f} | {_fmt(best)} | {_fmt(per_lr[best])} "
                     f"| {len(losses)}/{len(manifest['lrs'])} | {diverged} |")
    return "\n".join(lines)


def runs_table(records: list[RunRecord]) -> str:
    lines = ["| run | status | final val loss | steps | wall (min) |", "|---|---|---|---|---|"]
    for r in records:
        status = f"diverged at step {r.diverged_step}" if r.status == "diverged" else r.status
        lines.append(f"| `{r.key}` | {status} | {_fmt(r.summary.get('final_val_loss'))} "
                     f"| {r.summary.get('steps', '-')} | {_fmt(r.wall_s / 60, 3)} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- plots


def best_lr(records: list[RunRecord], variant: str) -> Optional[float]:
    """The LR with the lowest mean final val loss over the variant's finished runs (None: no LR grid)."""
    by_lr: dict[Optional[float], list[float]] = {}
    for r in records:
        if r.variant == variant and r.status == "finished":
            by_lr.setdefault(r.lr, []).append(r.summary.get("final_val_loss", math.nan))
    scored = {lr: Spread.of(v).mean for lr, v in by_lr.items()}
    scored = {lr: v for lr, v in scored.items() if math.isfinite(v)}
    return min(scored, key=scored.get) if scored else None


def plot_sweep(manifest: dict[str, Any], records: list[RunRecord], out: Path, cap: float) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written: dict[str, Path] = {}
    for name, x_of, xlabel in (("val_loss_vs_tokens", lambda r: r.tokens, "tokens"),
                               ("val_loss_vs_time", lambda r: {s: t / 60 for s, t in r.wall.items()},
                                "wall time (min)")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        drawn = False
        for i, variant in enumerate(manifest["variants"]):
            lr = best_lr(records, variant)
            runs = [r for r in records if r.variant == variant and r.lr == lr and r.status == "finished"]
            runs = [r for r in runs if r.val_loss and x_of(r)]
            steps = sorted(set.intersection(*(set(r.val_loss) & set(x_of(r)) for r in runs))) if runs else []
            if not steps:
                continue
            xs = [mean(x_of(r)[s] for r in runs) for s in steps]
            ys = [[r.val_loss[s] for r in runs] for s in steps]
            label = variant + (f" (lr {lr:g})" if lr is not None else "")
            label += f", {len(runs)} seeds" if len(runs) > 1 else ""
            ax.plot(xs, [mean(y) for y in ys], marker="o", ms=3, color=colors[i % len(colors)], label=label)
            if len(runs) > 1:
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=colors[i % len(colors)],
                                alpha=0.2)
            drawn = True
        if drawn:
            ax.set_title(f"{manifest['name']}: val loss (mean over seeds; band: min..max; diverged runs not drawn)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("val loss (nats)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            written[name] = out / f"{name}.png"
            fig.savefig(written[name], dpi=110)
        plt.close(fig)

    if len(manifest.get("lrs") or []) > 1:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, variant in enumerate(manifest["variants"]):
            losses = lr_losses([r for r in records if r.variant == variant], cap)
            if not losses:
                continue
            lrs = sorted(losses)
            capped = [Spread.of([min(v, cap) for v in losses[lr]]) for lr in lrs]
            ax.errorbar(lrs, [c.mean for c in capped], yerr=[0 if c.n < 2 else c.std for c in capped], marker="o",
                        capsize=3, color=colors[i % len(colors)],
                        label=f"{variant} (LR sensitivity {lr_sensitivity(losses, cap):.3f})")
        ax.axhline(cap, ls="--", color="grey", lw=1, label=f"L_cap = {cap:.3f} (diverged runs count as this)")
        ax.set_xscale("log")
        ax.set_title(f"{manifest['name']}: final val loss vs learning rate (mean ± std over seeds)")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final val loss (nats), capped at L_cap")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written["lr_sensitivity"] = out / "lr_sensitivity.png"
        fig.savefig(written["lr_sensitivity"], dpi=110)
        plt.close(fig)
    return written


# ------------------------------------------------------------------------------------------------- report


def write_sweep_report(sweep_dir: Path, out: Path, noise_dir: Optional[Path] = None) -> Path:
    """summary.md and PNGs of a sweep into `out`; `noise_dir`: a sweep of one config over several seeds whose spread
    gives verdicts where this sweep has fewer than 2 seeds per cell (see compare)."""
    manifest, records = load_sweep(sweep_dir)
    noise = seed_noise(noise_dir) if noise_dir is not None else None
    out.mkdir(parents=True, exist_ok=True)
    vocab = manifest.get("vocab_size")
    cap = math.log(vocab) if vocab else math.nan
    seeds = manifest.get("seeds") or sorted({r.seed for r in records})
    text = [f"# Sweep report: {manifest['name']}", ""]
    if manifest.get("description"):
        text += [manifest["description"].strip(), ""]
    match = manifest.get("match") or {}
    budgets = {r.get("tokens") for r in manifest.get("runs", [])}
    tokens = f"{budgets.pop():,} tokens per run" if len(budgets) == 1 and None not in budgets else \
        "tokens (the budget is not computable from the config)"
    text += [f"- Folder: `{sweep_dir}`; spec: `{manifest.get('spec', '?')}`; base: "
             + ", ".join(f"`{b}`" for b in manifest.get("base", [])),
             f"- Held equal: {tokens}" + (f"; {match['quantity']} (sized by `{match['by']}`)" if match
                                          else "; parameters not matched"),
             f"- Seeds: {seeds} (seed s of every variant shares init and data order); "
             f"baseline: `{manifest['baseline']}`",
             f"- Runs: {len(records)}; " + ", ".join(f"{sum(r.status == s for r in records)} {s}"
                                                    for s in ("finished", "diverged", "failed", "pending")), ""]
    if noise is not None:
        text += [f"- Seed noise: final val loss {noise} over {noise.n} seeds of one config (`{noise_dir}`); where a "
                 "cell has fewer than 2 seeds, its verdict compares the difference with it (kσ: the difference "
                 "over its standard error, σ·sqrt(1/n + 1/n_baseline)).", ""]
    if len(seeds) < 3:
        text += [f"**Fewer than 3 seeds ({len(seeds)})**: the spread of each cell is not measured well; no verdict "
                 "here is a ranking.", ""]
    text += ["## Results per variant and learning rate", "", sweep_table(manifest, records, noise), "",
             "Mean ± sample std over seeds. Losses, bpb, tokens/s, memory and wall time are over the runs that "
             "finished without diverging; the logit maxima over every run with events. Verdict: a variant differs "
             "from the baseline at the same LR only when the two mean ± std intervals do not overlap; otherwise "
             "\"no difference\". N: non-embedding parameters (no token/position embedding, no LM head). A run "
             "diverged when SpikeDetector stopped it, or its training loss ends NaN/inf or more than 1 nat above "
             "its lowest value (the step is where it left that range for good). \"-\": not logged (peak GPU "
             "memory only on CUDA).", ""]
    if len(manifest.get("lrs") or []) > 1:
        text += ["## Learning-rate sensitivity", "", sensitivity_table(manifest, records, cap), "",
                 "LR sensitivity (Wortsman et al. 2023 §3.1) = mean over the LR grid of "
                 "[min(loss(lr), L_cap) − min over the grid of loss(lr)], loss(lr) = mean over seeds of the final "
                 f"val loss, a diverged run counted as L_cap = ln(vocab) = {cap:.3f}. Lower: less sensitive. Failed "
                 "or pending runs are left out (the column of LRs says how much of the grid has results).", ""]
    plots = plot_sweep(manifest, records, out, cap)
    text += [f"![{name}]({path.name})" for name, path in plots.items()]
    if not plots:
        text += ["No plots: no run has logged val/loss yet."]
    text += ["", "## Runs", "", runs_table(records), ""]
    path = out / "summary.md"
    path.write_text("\n".join(text) + "\n")
    return path
