"""The report of a sweep folder (`llmtrain report SWEEP_DIR`, folders made by `llmtrain sweep`).

summary.md holds one row per variant and learning rate, aggregated over seeds as mean ± std (sample std): final
val loss and bpb, tokens/s, peak GPU memory, wall time, max attention and output logit, spikes, and how many runs
diverged and at which steps. Each variant is compared with the baseline at the same LR over paired seeds (seed s
of every variant shares init and data order, llmtrain/sweep.py): the mean of the per-seed differences of the final
val loss, its standard error, a 95% confidence interval from Student's t with n-1 degrees of freedom, and a verdict
read from that interval: lower or higher when it excludes 0, else "no difference". Only seeds where both runs
finished are paired; a diverged or stalled run is left out of the interval and named in the verdict. A finished run
is stalled when its final val loss is at or above the unigram entropy of its val split (read from the shards its
config names): it learned nothing of the context. With a single pair, a measured seed noise (`--noise`) gives the
interval instead, marked as weaker evidence (llmtrain/stats.py).

Per variant, over every LR and seed: the LR sensitivity of Wortsman et al. 2023 §3.1 (with an LR grid),

    LR sensitivity = mean over the LR grid of [ min(loss(lr), L_cap) - min over the grid of loss(lr) ]

where loss(lr) is the mean over seeds of the final val loss, a diverged run counts as L_cap, and L_cap = ln(vocab)
(the loss of a uniform guess, about the loss at initialisation); and stability: the largest attention and output
logit, spike events and diverged runs. Plots: val loss vs tokens and vs wall time per variant (at its best LR;
band: min..max over seeds), beside it each variant's paired difference from the baseline over training (per LR;
band: the 95% interval), and val loss vs LR per variant. summary.json holds the same numbers (strict JSON).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Callable, Iterator, Optional

import yaml

from llmtrain.data.shards import ShardError, unigram_entropy
from llmtrain.events import read_scalars, wall_clock
from llmtrain.report import ATTN_MAX, OUTPUT_LOGIT_TAG, VAL_LOSS_TAG, _fmt, strict_json, summarize_run
from llmtrain.stats import LEVEL, Difference, decimals_for, plus_minus


@dataclass
class RunRecord:
    """One run of the sweep: what sweep.json and result.json say, and what its events hold."""

    key: str
    variant: str
    lr: Optional[float]
    seed: int
    status: str  # finished | stalled | diverged | failed | pending
    diverged_step: Optional[int] = None
    wall_s: float = math.nan
    params: int = 0
    shape: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # report.summarize_run; empty without events
    val_loss: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, float] = field(default_factory=dict)  # step -> tokens trained on (val steps)
    wall: dict[int, float] = field(default_factory=dict)  # step -> seconds of training (val steps)
    tags: set[str] = field(default_factory=set)  # every tag its events hold (logged vs NaN)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # tag -> step -> value, for the report's curves


def _tokens_at(tokens: dict[int, float], step: int) -> float:
    """train/tokens at the last step at or before `step` (val is logged at the step training reached)."""
    before = [s for s in tokens if s <= step]
    if before:
        return tokens[max(before)]
    last = max(tokens)
    return tokens[last] * step / (last + 1)  # before the first logged step: the constant rate


def _number(value: Optional[float]) -> float:
    """A number read from JSON: null (how strict JSON writes NaN) and a missing value as NaN."""
    return math.nan if value is None else float(value)


def load_sweep(sweep_dir: Path, curves: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[RunRecord]]:
    """sweep.json (or, without it, what the result.json files tell) and a record for every run, pending included;
    `curves`: tags to keep over training besides those sweep.json names (the spec's `curves`)."""
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
    manifest["curves"] = list(dict.fromkeys([*manifest.get("curves", []), *curves]))
    records = []
    for run in planned:
        result = results.get(run["key"], {})
        record = RunRecord(key=run["key"], variant=run["variant"], lr=run["lr"], seed=run["seed"],
                           status=result.get("status", "pending"), diverged_step=result.get("diverged_step"),
                           wall_s=_number(result.get("wall_s")), params=run.get("params", 0),
                           shape=run.get("shape", {}))
        run_dir = sweep_dir / run["key"]
        if result and any(run_dir.glob("events.out.tfevents.*")):
            scalars = read_scalars(run_dir)
            record.summary = summarize_run(scalars)
            record.tags = set(scalars)
            record.val_loss = scalars.get(VAL_LOSS_TAG, {})
            record.curves = {tag: scalars[tag] for tag in manifest["curves"] if tag in scalars}
            train_tokens = scalars.get("train/tokens", {})
            if train_tokens:
                record.tokens = {s: _tokens_at(train_tokens, s) for s in record.val_loss}
            record.wall = wall_clock(run_dir, VAL_LOSS_TAG)
        records.append(record)
    if "variants" not in manifest:
        variants = list(dict.fromkeys(r.variant for r in records))
        manifest.update(name=sweep_dir.name, variants=variants, baseline=variants[0],
                        lrs=sorted({r.lr for r in records if r.lr is not None}), vocab_size=None)
    manifest["unigram"] = mark_stalled(sweep_dir, records)
    return manifest, records


STALLED = "stalled"
CURVED = ("finished", STALLED)  # runs whose curves are drawn and whose loss counts as loss(lr): real, finite losses


def mark_stalled(sweep_dir: Path, records: list[RunRecord]) -> dict[str, Optional[float]]:
    """Finished runs whose final val loss is at or above the unigram entropy of their val split become "stalled":
    no prediction that ignores the context scores below that entropy, so such a run learned nothing of it (e.g.
    post-norm without warmup). Returns data_dir -> that entropy; None where the shards are not readable from here
    (relative paths are taken from the working directory, as `llmtrain fit` took them), and those runs unchecked."""
    levels: dict[str, Optional[float]] = {}
    for record in records:
        data_dir = _data_dir(sweep_dir / record.key) if record.status == "finished" else None
        if data_dir is None:
            continue
        if data_dir not in levels:
            try:
                levels[data_dir] = unigram_entropy(data_dir)
            except (ShardError, OSError, KeyError, ZeroDivisionError):
                levels[data_dir] = None
        level = levels[data_dir]
        if level is not None and _final_loss(record) >= level:
            record.status = STALLED
    return levels


def _data_dir(run_dir: Path) -> Optional[str]:
    """The shards folder a run trained on, from the config.yaml its fit wrote (None: no such file or field)."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    data = config.get("data") if isinstance(config, dict) else None
    data_dir = data.get("data_dir") if isinstance(data, dict) else None
    return str(data_dir) if data_dir else None


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class Spread:
    """Mean ± sample std of the finite values over seeds (std NaN with fewer than 2). `fmt` None: nats, to the
    decimals that show the std (plus_minus)."""

    mean: float
    std: float
    n: int
    fmt: Optional[Callable[[float], str]] = _fmt

    @classmethod
    def of(cls, values: list[float], fmt: Optional[Callable[[float], str]] = _fmt) -> "Spread":
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, 0, fmt)
        return cls(mean(finite), stdev(finite) if len(finite) > 1 else math.nan, len(finite), fmt)

    def __str__(self) -> str:
        if self.n == 0:
            return "-"
        if self.fmt is None:
            return plus_minus(self.mean, self.std)
        return self.fmt(self.mean) if self.n == 1 else f"{self.fmt(self.mean)} ± {self.fmt(self.std)}"


def _shown(path: str) -> str:
    """A path of the manifest (absolute, for the runs) as the report shows it: relative to the current directory
    where it lies inside it (the repository, when run from there), so the report names no machine's folders."""
    try:
        return Path(path).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path


def _thousands(value: float) -> str:
    return f"{value:,.0f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _final_loss(record: RunRecord) -> float:
    return record.summary.get("final_val_loss", math.nan) if record.summary else math.nan


@dataclass
class Comparison:
    """One variant against the baseline at one LR over paired seeds."""

    difference: Difference
    seeds: list[int]  # the pairs in the interval: both runs finished with a final val loss
    diverged: dict[str, list[int]]  # "variant" / "baseline" -> seeds whose run diverged
    total: int  # seeds where both sides have a result (finished, stalled or diverged)
    stalled: dict[str, list[int]] = field(default_factory=lambda: {"variant": [], "baseline": []})

    @property
    def verdict(self) -> str:
        d, left_out = self.difference, self._left_out()
        if d.n == 0:
            return self._divergence_only()
        if d.verdict == "-":
            text = "n/a (1 paired seed: needs ≥ 2, or a seed-noise sweep: --noise)"
        elif d.basis == "seed noise":
            text = f"{d.verdict} (1 seed, read against the seed noise: weaker evidence)"
        else:
            text = d.verdict
        return text + (f"; left out: {left_out}" if left_out else "")

    def _left_out(self) -> str:
        return ", ".join(f"seed {s} ({side} {what})" for what, sides in (("diverged", self.diverged),
                                                                           ("stalled", self.stalled))
                         for side in ("variant", "baseline") for s in sides[side])

    def _divergence_only(self) -> str:
        counts = [len(sides[side]) for sides in (self.diverged, self.stalled) for side in ("variant", "baseline")]
        if not any(counts):
            return "-"
        n = self.total
        if not counts[2] and not counts[3]:
            return f"no paired loss: diverged {counts[0]}/{n} seeds, baseline {counts[1]}/{n}"
        return (f"no paired loss: variant diverged {counts[0]}/{n}, stalled {counts[2]}/{n} seeds; baseline "
                f"diverged {counts[1]}/{n}, stalled {counts[3]}/{n}")

    @property
    def delta(self) -> str:
        d = self.difference
        if d.n == 0:
            return "-"
        if math.isnan(d.se):
            return f"{d.mean:+.3f} (1 seed)"
        value = plus_minus(d.mean, d.se)
        sign = "+" if d.mean >= 0 else ""
        return f"{sign}{value} ({d.n} seeds)" if d.basis == "paired" else f"{sign}{value} (1 seed, se from noise)"

    @property
    def interval(self) -> str:
        low, high = self.difference.interval
        if math.isnan(low):
            return "-"
        places = decimals_for(self.difference.se)
        return f"[{low:+.{places}f}, {high:+.{places}f}]"

    def as_dict(self) -> dict[str, Any]:
        d = self.difference
        return {"basis": d.basis, "seeds": self.seeds, "mean": d.mean, "se": d.se, "df": d.df,
                "interval": list(d.interval), "level": LEVEL, "verdict": self.verdict, "diverged": self.diverged,
                "stalled": self.stalled}


def compare(variant_runs: list[RunRecord], base_runs: list[RunRecord], noise: Optional[Spread] = None) -> Comparison:
    """The paired comparison of one variant with the baseline at one LR. Seeds pair up where both runs finished
    with a final val loss; a seed where either side diverged or stalled is left out of the interval and counted; a
    failed or pending run pairs with nothing. One pair: the seed noise `noise` (≥ 2 seeds of one config) gives the
    interval."""
    variant, base = {r.seed: r for r in variant_runs}, {r.seed: r for r in base_runs}
    shared = sorted(s for s in variant.keys() & base.keys()
                    if {variant[s].status, base[s].status} <= {"finished", STALLED, "diverged"})
    pairs = [s for s in shared if variant[s].status == base[s].status == "finished"
             and math.isfinite(_final_loss(variant[s])) and math.isfinite(_final_loss(base[s]))]
    diverged, stalled = ({"variant": [s for s in shared if variant[s].status == status],
                          "baseline": [s for s in shared if base[s].status == status]}
                         for status in ("diverged", STALLED))
    differences = [_final_loss(variant[s]) - _final_loss(base[s]) for s in pairs]
    if len(differences) == 1 and noise is not None and noise.n >= 2:
        difference = Difference.against_noise(differences[0], noise.std, noise.n)
    else:
        difference = Difference.paired(differences)
    return Comparison(difference, pairs, diverged, len(shared), stalled)


def seed_noise(sweep_dir: Path) -> Spread:
    """The seed spread of the final val loss in a sweep of one config over several seeds: its baseline variant's
    finished runs at its first learning rate."""
    manifest, records = load_sweep(sweep_dir)
    runs = [r for r in records if r.variant == manifest["baseline"] and r.status == "finished"]
    first_lr = min((r.lr for r in runs), key=lambda lr: (lr is not None, lr or 0.0), default=None)
    return _cell([r for r in runs if r.lr == first_lr], "final_val_loss", None)


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
    """Final val loss per LR of one variant: finished and stalled runs as logged, diverged runs as `cap`; failed and
    pending runs are not results and stay out."""
    losses: dict[float, list[float]] = {}
    for r in records:
        if r.status == "diverged":
            losses.setdefault(r.lr, []).append(cap)
        elif r.status in CURVED:
            losses.setdefault(r.lr, []).append(r.summary.get("final_val_loss", math.nan))
    return losses


# ------------------------------------------------------------------------------------------------- tables


def _cell(records: list[RunRecord], key: str, fmt: Optional[Callable[[float], str]] = _fmt) -> Spread:
    return Spread.of([r.summary.get(key, math.nan) for r in records if r.summary], fmt)


def _lrs(records: list[RunRecord]) -> list[Optional[float]]:
    return sorted({r.lr for r in records}, key=lambda lr: (lr is None, lr or 0.0))


def comparisons(manifest: dict[str, Any], records: list[RunRecord],
                noise: Optional[Spread] = None) -> dict[tuple[str, Optional[float]], Comparison]:
    """(variant, LR) -> its comparison with the baseline at that LR, for every variant but the baseline."""
    baseline = manifest["baseline"]
    out = {}
    for lr in _lrs(records):
        base_runs = [r for r in records if r.variant == baseline and r.lr == lr]
        for variant in manifest["variants"]:
            runs = [r for r in records if r.variant == variant and r.lr == lr]
            if runs and variant != baseline:
                out[(variant, lr)] = compare(runs, base_runs, noise)
    return out


def _diverged(runs: list[RunRecord]) -> str:
    diverged = [r for r in runs if r.status == "diverged"]
    return f"{len(diverged)} ({', '.join(str(r.diverged_step) for r in diverged)})" if diverged else "0"


def _groups(manifest: dict[str, Any], records: list[RunRecord]
            ) -> Iterator[tuple[Optional[float], str, list[RunRecord], list[RunRecord]]]:
    """(lr, variant, its runs, the finished ones) for every cell of the sweep that has runs, in table order."""
    for lr in _lrs(records):
        for variant in manifest["variants"]:
            runs = [r for r in records if r.variant == variant and r.lr == lr]
            if runs:
                yield lr, variant, runs, [r for r in runs if r.status == "finished"]


def sweep_table(manifest: dict[str, Any], records: list[RunRecord],
                compared: dict[tuple[str, Optional[float]], Comparison]) -> str:
    lines = ["| variant | LR | runs ok | N (non-emb.) | d_model / n_layer / d_ff | final val loss | Δ vs baseline "
             "(paired) | 95% CI of Δ | verdict | val bpb | tokens/s | peak GPU mem (GiB) | wall (min) "
             "| max attn logit | max output logit | spikes | diverged (steps) |", "|" + "---|" * 17]
    for lr, variant, runs, ok in _groups(manifest, records):
        comparison = compared.get((variant, lr))
        delta, interval, verdict = ((comparison.delta, comparison.interval, comparison.verdict) if comparison
                                    else ("", "", "baseline"))
        other = [f"{sum(r.status == s for r in runs)} {s}" for s in ("failed", "pending")
                 if any(r.status == s for r in runs)]
        shape = runs[0].shape
        lines.append(
            f"| {variant} | {_fmt(lr) if lr is not None else 'base'} | {len(ok)}/{len(runs)}"
            f"{' (' + ', '.join(other) + ')' if other else ''} | {_count(runs[0].params)} "
            f"| {shape.get('d_model', '-')} / {shape.get('n_layer', '-')} / {shape.get('d_ff', '-')} "
            f"| {_cell(ok, 'final_val_loss', None)} | {delta} | {interval} | {verdict} "
            f"| {_cell(ok, 'final_val_bpb', None)} | {_cell(ok, 'tokens_per_sec', _thousands)} "
            f"| {_cell(ok, 'gpu_mem_peak_gib')} | {Spread.of([r.wall_s / 60 for r in ok], lambda v: f'{v:.3g}')} "
            f"| {_cell(runs, 'max_attn_logit')} | {_cell(runs, 'max_output_logit')} "
            f"| {_cell(runs, 'spikes', lambda v: f'{v:.3g}')} | {_diverged(runs)} |")
    return "\n".join(lines)


def stability(runs: list[RunRecord]) -> dict[str, Any]:
    """Over every run of a variant (all LRs and seeds, diverged ones included): the largest attention and output
    logit and the LR of the run that reached it, spike events in all and runs with any, diverged runs."""
    out: dict[str, Any] = {}
    logged = {"max_attn_logit": lambda r: any(ATTN_MAX.match(tag) for tag in r.tags),
              "max_output_logit": lambda r: OUTPUT_LOGIT_TAG in r.tags}
    for key in ("max_attn_logit", "max_output_logit"):
        values = [(r.summary[key], r) for r in runs if r.summary and logged[key](r)]  # NaN here: a NaN logit
        finite = [(v, r) for v, r in values if math.isfinite(v)]
        top = max(finite, key=lambda vr: vr[0]) if finite else None
        out[key] = {"value": top[0] if top else math.nan, "lr": top[1].lr if top else None,
                    "nonfinite_runs": len(values) - len(finite)}
    spikes = [int(r.summary.get("spikes", 0)) for r in runs if r.summary]
    out["spikes"] = {"events": sum(spikes), "runs_with_any": sum(s > 0 for s in spikes),
                     "runs_with_events": len(spikes)}
    out["diverged"] = [{"key": r.key, "lr": r.lr, "seed": r.seed, "step": r.diverged_step}
                       for r in runs if r.status == "diverged"]
    out["stalled"] = [{"key": r.key, "lr": r.lr, "seed": r.seed, "final_val_loss": _final_loss(r)}
                      for r in runs if r.status == STALLED]
    out["runs"] = len(runs)
    return out


def _logit(entry: dict[str, Any]) -> str:
    if math.isnan(entry["value"]):
        text = "-"
    else:
        text = f"{entry['value']:,.3g}" if entry["value"] < 1000 else f"{entry['value']:,.0f}"
        text += f" (lr {entry['lr']:g})" if entry["lr"] is not None else ""
    return text + (f"; non-finite in {entry['nonfinite_runs']} runs" if entry["nonfinite_runs"] else "")


def variant_table(manifest: dict[str, Any], records: list[RunRecord], cap: float) -> str:
    """Per variant: LR sensitivity (with an LR grid) and stability over all its runs."""
    grid = len(manifest.get("lrs") or []) > 1
    lines = ["| variant | LR sensitivity (nats) | best LR | loss at best LR | LRs with results | max attn logit (LR) "
             "| max output logit (LR) | spikes (runs with any) | diverged runs | stalled runs |", "|" + "---|" * 10]
    for variant in manifest["variants"]:
        runs = [r for r in records if r.variant == variant]
        losses = lr_losses(runs, cap)
        sensitivity = ["-"] * 4
        if grid:
            sensitivity[3] = f"{len(losses)}/{len(manifest['lrs'])}"
        if grid and losses:
            per_lr = {lr: mean(min(v, cap) for v in values) for lr, values in losses.items()}
            best = min(per_lr, key=per_lr.get)
            sensitivity[:3] = [f"{lr_sensitivity(losses, cap):.4f}", _fmt(best), _fmt(per_lr[best])]
        s = stability(runs)
        spikes = s["spikes"]
        diverged = ", ".join(f"lr {d['lr']:g} seed {d['seed']} at {d['step']}" if d["lr"] is not None
                             else f"seed {d['seed']} at {d['step']}" for d in s["diverged"])
        stalled = ", ".join(f"lr {d['lr']:g} seed {d['seed']}" if d["lr"] is not None else f"seed {d['seed']}"
                            for d in s["stalled"])
        lines.append(f"| {variant} | {' | '.join(sensitivity)} | {_logit(s['max_attn_logit'])} "
                     f"| {_logit(s['max_output_logit'])} | {spikes['events']} ({spikes['runs_with_any']}/"
                     f"{spikes['runs_with_events']}) | {len(s['diverged'])}/{len(runs)}"
                     f"{' (' + diverged + ')' if diverged else ''} | {len(s['stalled'])}/{len(runs)}"
                     f"{' (' + stalled + ')' if stalled else ''} |")
    return "\n".join(lines)


def _unigram_line(levels: dict[str, Optional[float]]) -> str:
    """The header line that says against what level runs were checked for stalling."""
    if not levels:
        return "- Stalled runs: not checked (no finished run names a shards folder in its config.yaml)"
    return "- Unigram level (stalled at or above it): " + "; ".join(
        f"{level:.3f} nats, the val split of `{data_dir}`" if level is not None
        else f"not checked, no val split readable at `{data_dir}` from here" for data_dir, level in levels.items())


def runs_table(records: list[RunRecord]) -> str:
    lines = ["| run | status | final val loss | steps | wall (min) |", "|---|---|---|---|---|"]
    for r in records:
        status = f"diverged at step {r.diverged_step}" if r.status == "diverged" else r.status
        loss = _final_loss(r)
        shown = f"{loss:.3f}" if math.isfinite(loss) else _fmt(r.summary.get("final_val_loss"))
        lines.append(f"| `{r.key}` | {status} | {shown} | {r.summary.get('steps', '-')} | {_fmt(r.wall_s / 60, 3)} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- plots


def best_lr(records: list[RunRecord], variant: str) -> Optional[float]:
    """The LR with the lowest mean final val loss over the variant's finished and stalled runs (None: no LR
    grid)."""
    by_lr: dict[Optional[float], list[float]] = {}
    for r in records:
        if r.variant == variant and r.status in CURVED:
            by_lr.setdefault(r.lr, []).append(r.summary.get("final_val_loss", math.nan))
    scored = {lr: Spread.of(v).mean for lr, v in by_lr.items()}
    scored = {lr: v for lr, v in scored.items() if math.isfinite(v)}
    return min(scored, key=scored.get) if scored else None


def difference_curve(variant_runs: list[RunRecord], base_runs: list[RunRecord]
                     ) -> tuple[list[float], list[Difference], int]:
    """(x, paired difference of the val loss at each val step, pairs): over the seeds where both runs finished,
    at the steps every one of those runs logged; x is tokens (the baseline's mean), or the step without them."""
    base = {r.seed: r for r in base_runs if r.status == "finished" and r.val_loss}
    pairs = [(r, base[r.seed]) for r in variant_runs if r.status == "finished" and r.val_loss and r.seed in base]
    if not pairs:
        return [], [], 0
    steps = sorted(set.intersection(*(set(v.val_loss) & set(b.val_loss) for v, b in pairs)))
    with_tokens = all(b.tokens for _, b in pairs)
    xs = [mean(b.tokens[s] for _, b in pairs) if with_tokens else float(s) for s in steps]
    diffs = [Difference.paired([v.val_loss[s] - b.val_loss[s] for v, b in pairs]) for s in steps]
    return xs, diffs, len(pairs)


def _plot_differences(plt: Any, manifest: dict[str, Any], records: list[RunRecord], path: Path) -> bool:
    """One panel per LR: each variant's val loss minus the baseline's over training, mean over paired seeds with
    its 95% t interval as the band (none with one seed). False when there is nothing to draw."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    baseline, lrs = manifest["baseline"], _lrs(records)
    fig, axes = plt.subplots(len(lrs), 1, figsize=(8, 3.2 * len(lrs)), squeeze=False, sharex=True)
    drawn, with_tokens = False, True
    for ax, lr in zip(axes[:, 0], lrs):
        base_runs = [r for r in records if r.variant == baseline and r.lr == lr]
        for i, variant in enumerate(manifest["variants"]):
            if variant == baseline:
                continue
            xs, diffs, n = difference_curve([r for r in records if r.variant == variant and r.lr == lr], base_runs)
            if not xs:
                continue
            with_tokens = with_tokens and any(r.tokens for r in base_runs)
            color = colors[i % len(colors)]
            ax.plot(xs, [d.mean for d in diffs], marker="o", ms=3, color=color,
                    label=f"{variant} ({n} seed{'s' if n > 1 else ''})")
            if n >= 2:
                ax.fill_between(xs, [d.interval[0] for d in diffs], [d.interval[1] for d in diffs], color=color,
                                alpha=0.2)
            drawn = True
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_title(f"LR {lr:g}" if lr is not None else "", fontsize=9)
        ax.set_ylabel(f"val loss − {baseline} (nats)", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if drawn:
        axes[-1, 0].set_xlabel("tokens" if with_tokens else "step")
        fig.suptitle(f"{manifest['name']}: difference from {baseline} at the same LR (mean over paired seeds; "
                     "band: 95% t interval)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def series_label(variant: str, lr: Optional[float], n_runs: int) -> str:
    return variant + (f" (lr {lr:g})" if lr is not None else "") + (f", {n_runs} seeds" if n_runs > 1 else "")


def mean_band(ax: Any, xs: list[float], values: list[list[float]], color: str, label: str, **style: Any) -> None:
    """The mean over runs at each x as a line; with several runs, their min..max as a band."""
    ax.plot(xs, [mean(v) for v in values], color=color, label=label, **style)
    if len(values[0]) > 1:
        ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2)


def finish_axes(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


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
            runs = [r for r in records if r.variant == variant and r.lr == lr and r.status in CURVED]
            runs = [r for r in runs if r.val_loss and x_of(r)]
            steps = sorted(set.intersection(*(set(r.val_loss) & set(x_of(r)) for r in runs))) if runs else []
            if not steps:
                continue
            xs = [mean(x_of(r)[s] for r in runs) for s in steps]
            mean_band(ax, xs, [[r.val_loss[s] for r in runs] for s in steps], colors[i % len(colors)],
                      series_label(variant, lr, len(runs)), marker="o", ms=3)
            drawn = True
        if drawn:
            finish_axes(ax, f"{manifest['name']}: val loss (mean over seeds; band: min..max; diverged runs not "
                            "drawn)", xlabel, "val loss (nats)")
            fig.tight_layout()
            written[name] = out / f"{name}.png"
            fig.savefig(written[name], dpi=110)
        plt.close(fig)
        if name == "val_loss_vs_tokens" and len(manifest["variants"]) > 1:
            path = out / "val_loss_diff_vs_tokens.png"
            if _plot_differences(plt, manifest, records, path):
                written["val_loss_diff_vs_tokens"] = path

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
        finish_axes(ax, f"{manifest['name']}: final val loss vs learning rate (mean ± std over seeds)",
                    "learning rate", "final val loss (nats), capped at L_cap")
        fig.tight_layout()
        written["lr_sensitivity"] = out / "lr_sensitivity.png"
        fig.savefig(written["lr_sensitivity"], dpi=110)
        plt.close(fig)
    return written


def curve_runs(records: list[RunRecord], variant: str, tag: str
               ) -> tuple[Optional[float], list[RunRecord], list[int]]:
    """(the variant's best LR, its finished and stalled runs there that logged `tag`, the steps every one of them
    logged)."""
    lr = best_lr(records, variant)
    runs = [r for r in records if r.variant == variant and r.lr == lr and r.status in CURVED and r.curves.get(tag)]
    steps = sorted(set.intersection(*(set(r.curves[tag]) for r in runs))) if runs else []
    return lr, runs, steps


def curve_table(manifest: dict[str, Any], records: list[RunRecord], tag: str) -> str:
    """Per variant (at its best LR): the tag at the last step every seed logged, and its change from the first."""
    lines = [f"| variant | LR | seeds | `{tag}` first | last (step) | last / first |", "|---|---|---|---|---|---|"]
    for variant in manifest["variants"]:
        lr, runs, steps = curve_runs(records, variant, tag)
        if not steps:
            continue
        first, last = (Spread.of([r.curves[tag][step] for r in runs], fmt=None) for step in (steps[0], steps[-1]))
        ratio = Spread.of([r.curves[tag][steps[-1]] / r.curves[tag][steps[0]] for r in runs], fmt=None)
        lines.append(f"| {variant} | {'base' if lr is None else f'{lr:g}'} | {len(runs)} | {first} | {last} "
                     f"({steps[-1]}) | {ratio} |")
    return "\n".join(lines)


def plot_curve(manifest: dict[str, Any], records: list[RunRecord], tag: str, path: Path) -> bool:
    """The tag over training steps, one line per variant at its best LR: mean over seeds, band min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for i, variant in enumerate(manifest["variants"]):
        lr, runs, steps = curve_runs(records, variant, tag)
        if not steps:
            continue
        mean_band(ax, steps, [[r.curves[tag][s] for r in runs] for s in steps], colors[i % len(colors)],
                  series_label(variant, lr, len(runs)))
        drawn = True
    if drawn:
        finish_axes(ax, f"{manifest['name']}: {tag} (mean over seeds; band: min..max)", "step", tag)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def curve_file(tag: str) -> str:
    return "curve_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", tag) + ".png"


# ------------------------------------------------------------------------------------------------- report


def summary_data(manifest: dict[str, Any], records: list[RunRecord], noise: Optional[Spread], cap: float,
                 compared: dict[tuple[str, Optional[float]], Comparison]) -> dict[str, Any]:
    """The numbers of summary.md as data (summary.json): per variant and LR, per variant, per run."""
    cells = []
    for lr, variant, runs, ok in _groups(manifest, records):
        loss = _cell(ok, "final_val_loss")
        comparison = compared.get((variant, lr))
        cells.append({"variant": variant, "lr": lr, "runs": len(runs), "finished": len(ok),
                      "final_val_loss": {"mean": loss.mean, "std": loss.std, "n": loss.n},
                      "vs_baseline": comparison.as_dict() if comparison else None,
                      "diverged": [{"seed": r.seed, "step": r.diverged_step} for r in runs
                                   if r.status == "diverged"],
                      "stalled": [r.seed for r in runs if r.status == STALLED]})
    variants = []
    for variant in manifest["variants"]:
        runs = [r for r in records if r.variant == variant]
        losses = lr_losses(runs, cap)
        variants.append({"variant": variant, "lr_sensitivity": lr_sensitivity(losses, cap) if losses else None,
                         "stability": stability(runs)})
    return {"name": manifest["name"], "baseline": manifest["baseline"], "level": LEVEL,
            "seeds": manifest.get("seeds"), "lrs": manifest.get("lrs"), "l_cap": cap,
            "seed_noise": {"mean": noise.mean, "std": noise.std, "n": noise.n} if noise else None,
            "cells": cells, "variants": variants,
            "runs": [{"key": r.key, "variant": r.variant, "lr": r.lr, "seed": r.seed, "status": r.status,
                      "diverged_step": r.diverged_step, "wall_s": r.wall_s, "summary": r.summary} for r in records]}


def write_sweep_report(sweep_dir: Path, out: Path, noise_dir: Optional[Path] = None,
                       curves: tuple[str, ...] = (), baseline: Optional[str] = None) -> Path:
    """summary.md, summary.json and PNGs of a sweep into `out`; `noise_dir`: a sweep of one config over several
    seeds whose spread gives the interval where a comparison has a single paired seed (see compare); `curves`:
    TensorBoard tags to plot over training per variant, besides the spec's `curves`; `baseline`: the variant every
    other is compared with, instead of the spec's (e.g. two non-baseline variants against each other)."""
    manifest, records = load_sweep(sweep_dir, curves)
    if baseline is not None:
        if baseline not in manifest["variants"]:
            raise ValueError(f"baseline {baseline!r} is not a variant of {sweep_dir}: choose one of "
                             + ", ".join(manifest["variants"]))
        manifest["baseline"] = baseline
    noise = seed_noise(noise_dir) if noise_dir is not None else None
    out.mkdir(parents=True, exist_ok=True)
    vocab = manifest.get("vocab_size")
    cap = math.log(vocab) if vocab else math.nan
    seeds = manifest.get("seeds") or sorted({r.seed for r in records})
    compared = comparisons(manifest, records, noise)
    text = [f"# Sweep report: {manifest['name']}", ""]
    if manifest.get("description"):
        text += [manifest["description"].strip(), ""]
    match = manifest.get("match") or {}
    budgets = {r.get("tokens") for r in manifest.get("runs", [])}
    tokens = f"{budgets.pop():,} tokens per run" if len(budgets) == 1 and None not in budgets else \
        "tokens (the budget is not computable from the config)"
    text += [f"- Folder: `{sweep_dir}`; spec: `{_shown(manifest.get('spec', '?'))}`; base: "
             + ", ".join(f"`{_shown(b)}`" for b in manifest.get("base", [])),
             f"- Held equal: {tokens}" + (f"; {match['quantity']} (sized by `{match['by']}`)" if match
                                          else "; parameters not matched"),
             f"- Seeds: {seeds} (seed s of every variant shares init and data order); "
             f"baseline: `{manifest['baseline']}`",
             f"- Runs: {len(records)}; " + ", ".join(f"{sum(r.status == s for r in records)} {s}"
                                                    for s in ("finished", STALLED, "diverged", "failed", "pending")),
             _unigram_line(manifest["unigram"]), ""]
    if noise is not None:
        text += [f"- Seed noise: final val loss {noise} over {noise.n} seeds of one config (`{noise_dir}`); where a "
                 "comparison has a single paired seed, its interval is the difference ± t(n_noise − 1) · σ·√2 "
                 "(two runs' difference; σ the noise sweep's std): weaker evidence than paired seeds.", ""]
    if len(seeds) < 3:
        text += [f"**Fewer than 3 seeds ({len(seeds)})**: the spread of each cell is not measured well; with 2 "
                 "paired seeds the 95% interval uses t(1) = 12.7 and only large, consistent differences show.", ""]
    text += ["## Results per variant and learning rate", "", sweep_table(manifest, records, compared), "",
             "Final val loss and bpb: mean ± sample std over the seeds that finished (stalled runs not included), to "
             "the decimals that show the std. Δ vs baseline (paired): for every seed where both this variant and the "
             "baseline finished at this LR, this run's final val loss minus the baseline's; the cell is the mean ± "
             "standard error of those differences (sample std / √n). 95% CI: mean ± t(0.975, n − 1) · se. Verdict: "
             "\"lower\" or \"higher\" when the interval excludes 0, else \"no difference\" (at 95%); a seed where "
             "either run diverged or stalled is left out of the interval and named; with one paired seed there is no "
             "interval unless `--noise` gives the seed noise (weaker evidence, said in the cell). Tokens/s, memory "
             "and wall time: mean ± std over the finished runs; logit maxima and spikes over every run with events. "
             "N: non-embedding parameters (no token/position embedding, no LM head). A run diverged when "
             "SpikeDetector stopped it, or its training loss ends NaN/inf or more than 1 nat above its lowest value "
             "(the step is where it left that range for good); it stalled when it finished with a final val loss at "
             "or above the unigram entropy of its val split (it learned nothing of the context). \"-\": not logged "
             "(peak GPU memory only on CUDA).", ""]
    text += ["## Per variant: LR sensitivity and stability", "", variant_table(manifest, records, cap), ""]
    if len(manifest.get("lrs") or []) > 1:
        text += ["LR sensitivity (Wortsman et al. 2023 §3.1) = mean over the LR grid of "
                 "[min(loss(lr), L_cap) − min over the grid of loss(lr)], loss(lr) = mean over seeds of the final "
                 f"val loss, a diverged run counted as L_cap = ln(vocab) = {cap:.3f}. Lower: less sensitive. Failed "
                 "or pending runs are left out (the column of LRs says how much of the grid has results).", ""]
    text += ["Stability over every run of the variant (all LRs and seeds): the largest attention logit "
             "(stability/attn_logit_max) and output logit (stability/logits/max_abs) and the LR of the run that "
             "reached it, spike events (stability/spike/events) and the runs with any, diverged and stalled runs.",
             ""]
    plots = plot_sweep(manifest, records, out, cap)
    beside = [name for name in ("val_loss_vs_tokens", "val_loss_diff_vs_tokens") if name in plots]
    if beside:  # the raw curves and their differences side by side: at this scale the raw curves overlap
        text += [" ".join(f"![{name}]({plots[name].name})" for name in beside)]
    text += [f"![{name}]({path.name})" for name, path in plots.items() if name not in beside]
    if not plots:
        text += ["No plots: no run has logged val/loss yet."]
    for tag in manifest["curves"]:
        text += ["", f"## Over training: `{tag}`", ""]
        if not any(r.curves.get(tag) for r in records):
            text += [f"No finished run logged `{tag}`."]
            continue
        text += [curve_table(manifest, records, tag), "",
                 "Each variant at its best LR, over the seeds that finished or stalled: mean ± std of the value at the "
                 "first and the last step every seed logged, and of each run's last / first."]
        if plot_curve(manifest, records, tag, out / curve_file(tag)):
            text += ["", f"![{tag}]({curve_file(tag)})"]
    text += ["", "## Runs", "", runs_table(records), ""]
    (out / "summary.json").write_text(strict_json(summary_data(manifest, records, noise, cap, compared)) + "\n")
    path = out / "summary.md"
    path.write_text("\n".join(text) + "\n")
    return path
