"""`llmtrain report RUN_DIR [RUN_DIR ...] [--out DIR]`: the key curves of runs as PNG, and a markdown summary.
`llmtrain report SWEEP_DIR` (a folder made by `llmtrain sweep`): the sweep report of llmtrain/sweep_report.py.

Plots (one PNG each; several runs are overlaid): loss (spike events marked), output-logit max, attention-logit
max per layer, global weight RMS, global update ratio, spike score (with SpikeDetector's threshold). summary.md has
one row per run: final train loss (mean of the last TRAIN_LOSS_WINDOW logged values) and lowest train loss, final
val loss and bpb, largest attention and output logit, spike count, and whether and where the run diverged.

Run-level pieces (`summarize_run`, `diverged_at`, `plot_runs`, `summary_table`) are meant for reuse by reports
over many runs (sweeps).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from llmtrain.events import read_scalars

Scalars = dict[str, dict[int, float]]

# A run has diverged when its training loss ends NaN/inf or this many nats above its lowest value (diverged_at).
DIVERGENCE_MARGIN = 1.0
# "final train loss" is the mean of this many last logged values: one logged step is one noisy batch.
TRAIN_LOSS_WINDOW = 10
DEFAULT_SPIKE_THRESHOLD = 6.0  # SpikeDetector's default threshold (tests/callbacks/test_report.py checks it)
LOSS_TAG, VAL_LOSS_TAG = "train/loss", "val/loss"
EVENTS_TAG, SCORE_TAG = "stability/spike/events", "stability/spike/score"
OUTPUT_LOGIT_TAG = "stability/logits/max_abs"
ATTN_MAX = re.compile(r"stability/attn_logit_max/layer_(\d+)$")


def series(scalars: Scalars, tag: str) -> tuple[list[int], list[float]]:
    """Steps and values of one tag, in step order (empty when the tag was not logged)."""
    points = sorted(scalars.get(tag, {}).items())
    return [s for s, _ in points], [v for _, v in points]


def diverged_at(loss: dict[int, float], margin: float = DIVERGENCE_MARGIN) -> Optional[int]:
    """The step from which the loss stays NaN/inf or more than `margin` nats above its lowest value before that
    step, up to the end of the run; None when the run ends healthy (a bump it recovers from is not divergence)."""
    best, start = math.inf, None
    for step, value in sorted(loss.items()):
        if not math.isfinite(value) or value > best + margin:
            start = step if start is None else start
        else:
            start, best = None, min(best, value)
    return start


def _largest(values: dict[int, float]) -> float:
    """Largest value, NaN/inf included (a NaN logit is the largest news of all)."""
    vals = list(values.values())
    if any(math.isnan(v) for v in vals):
        return math.nan
    return max(vals) if vals else math.nan


def _last(values: dict[int, float]) -> float:
    return values[max(values)] if values else math.nan


def _mean_of_last(values: dict[int, float], n: int) -> float:
    """Mean of the last `n` logged values (NaN/inf included: a run that ends NaN has a NaN final loss)."""
    last = [values[s] for s in sorted(values)[-n:]]
    return sum(last) / len(last) if last else math.nan


def _median(values: dict[int, float]) -> float:
    vals = sorted(v for v in values.values() if math.isfinite(v))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def summarize_run(run: Union[str, Path, Scalars], margin: float = DIVERGENCE_MARGIN) -> dict[str, object]:
    """Key numbers of one run (a run folder, or the scalars read from one); NaN where a tag was not logged."""
    scalars = read_scalars(run) if isinstance(run, (str, Path)) else run
    loss = scalars.get(LOSS_TAG, {})
    finite = {s: v for s, v in loss.items() if math.isfinite(v)}
    min_step = min(finite, key=finite.get) if finite else None
    attn = {int(m[1]): _largest(values) for tag, values in scalars.items() if (m := ATTN_MAX.match(tag))}
    attn_layer = max(attn, key=lambda i: (math.isnan(attn[i]), attn[i])) if attn else None
    val_steps, val_values = series(scalars, VAL_LOSS_TAG)
    step = diverged_at(loss, margin)
    return {
        "steps": max(loss) + 1 if loss else 0,
        "final_loss": loss[max(loss)] if loss else math.nan,  # the last logged value
        "final_train_loss": _mean_of_last(loss, TRAIN_LOSS_WINDOW),
        "min_loss": finite[min_step] if min_step is not None else math.nan,
        "min_loss_step": min_step,
        "final_val_loss": val_values[-1] if val_values else math.nan,
        "final_val_bpb": _last(scalars.get("val/bpb", {})),
        # Throughput: the median window (a compile or checkpoint window does not move it); memory: the peak.
        "tokens_per_sec": _median(scalars.get("train/tokens_per_sec", {})),
        "gpu_mem_peak_gib": _largest(scalars.get("train/gpu_mem_peak_gib", {})),
        "max_attn_logit": attn[attn_layer] if attn_layer is not None else math.nan,
        "max_attn_logit_layer": attn_layer,
        "max_output_logit": _largest(scalars.get(OUTPUT_LOGIT_TAG, {})),
        "spikes": len(scalars.get(EVENTS_TAG, {})),
        "diverged": step is not None,
        "diverged_at": step,
    }


# ------------------------------------------------------------------------------------------------------ plots


@dataclass
class Plot:
    title: str
    ylabel: str
    tags: Callable[[Scalars], list[str]]  # the tags of a run to draw
    log_y: bool = False


def _tag(name: str) -> Callable[[Scalars], list[str]]:
    return lambda scalars: [name] if name in scalars else []


def _attn_layers(scalars: Scalars) -> list[str]:
    return sorted(tag for tag in scalars if ATTN_MAX.match(tag))


PLOTS: dict[str, Plot] = {
    "loss": Plot("training loss (x: spike events)", "loss (nats)", _tag(LOSS_TAG)),
    "logit_max": Plot("output logits: max |logit| on the probe batch", "max |logit|",
                      _tag(OUTPUT_LOGIT_TAG)),
    "attn_logit_max": Plot("attention logits: max |q·k|/sqrt(d) per layer", "max |logit|", _attn_layers,
                           log_y=True),
    "weight_rms": Plot("weight RMS (all parameters)", "RMS", _tag("stability/weight_rms/global")),
    "update_ratio": Plot("update ratio ||Δw|| / ||w|| (all parameters)", "ratio",
                         _tag("stability/update_ratio/global"), log_y=True),
    "spike_score": Plot("spike score (z) and events", "score", _tag(SCORE_TAG)),
}


def spike_threshold(run_dir: Union[str, Path]) -> tuple[float, str]:
    """SpikeDetector's threshold for a run and where it comes from: the run's config.yaml (the resolved config
    LightningCLI saves beside the events) when it has one, else SpikeDetector's default."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return DEFAULT_SPIKE_THRESHOLD, "SpikeDetector's default: no config.yaml in the run folder"
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return DEFAULT_SPIKE_THRESHOLD, f"SpikeDetector's default: {path} is not valid YAML"
    callbacks = ((config.get("trainer") or {}).get("callbacks") or []) if isinstance(config, dict) else []
    for callback in callbacks:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("SpikeDetector"):
            threshold = (callback.get("init_args") or {}).get("threshold")
            if threshold is not None:
                return float(threshold), "config.yaml"
            return DEFAULT_SPIKE_THRESHOLD, "SpikeDetector's default: config.yaml sets none"
    return DEFAULT_SPIKE_THRESHOLD, "SpikeDetector's default: config.yaml has no SpikeDetector"


def plot_runs(runs: dict[str, Scalars], out_dir: Union[str, Path],
              thresholds: Optional[dict[str, float]] = None) -> dict[str, Path]:
    """One PNG per entry of PLOTS that any run has data for; returns {plot name: path}. `thresholds`: each run's
    SpikeDetector threshold, drawn on the spike-score plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written: dict[str, Path] = {}
    for name, plot in PLOTS.items():
        if not any(plot.tags(scalars) for scalars in runs.values()):
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r, (label, scalars) in enumerate(runs.items()):
            color = colors[r % len(colors)]
            tags = plot.tags(scalars)
            for i, tag in enumerate(tags):
                steps, values = series(scalars, tag)
                depth = i / max(1, len(tags) - 1)
                if len(tags) == 1:
                    style = {"color": color, "label": label}
                elif len(runs) == 1:  # layers of one run: a colour scale from first to last layer
                    style = {"color": plt.cm.viridis(depth), "label": tag.rsplit("/", 1)[-1]}
                else:  # layers of several runs: the run's colour, darker with depth, the run named once
                    style = {"color": color, "alpha": 0.3 + 0.7 * depth, "label": label if i == len(tags) - 1 else None}
                ax.plot(steps, values, lw=1.2, **style)
            if name in ("loss", "spike_score") and scalars.get(EVENTS_TAG):
                events = sorted(scalars[EVENTS_TAG])
                ys = [_value_near(scalars.get(tags[0], {}) if tags else {}, s) for s in events]
                ax.scatter(events, ys, marker="x", color="red", zorder=3, s=40,
                           label=f"{label}: spikes" if len(runs) > 1 else "spikes")
        if name == "spike_score":
            shown = {label: (thresholds or {}).get(label) for label, scalars in runs.items() if plot.tags(scalars)}
            shown = {label: value for label, value in shown.items() if value is not None}
            if len(set(shown.values())) == 1:  # one line for every run
                ax.axhline(next(iter(shown.values())), ls="--", lw=1, color="red",
                           label=f"threshold {next(iter(shown.values())):g}")
            else:  # each run's own, in its colour
                for r, label in enumerate(runs):
                    if label in shown:
                        ax.axhline(shown[label], ls="--", lw=1, color=colors[r % len(colors)],
                                   label=f"{label}: threshold {shown[label]:g}")
        if name == "loss":
            for r, (label, scalars) in enumerate(runs.items()):
                steps, values = series(scalars, VAL_LOSS_TAG)
                if steps:
                    ax.plot(steps, values, ls="--", marker="o", ms=3, color=colors[r % len(colors)],
                            label=f"{label}: val" if len(runs) > 1 else "val/loss")
        if plot.log_y:
            ax.set_yscale("log")
        ax.set_title(plot.title)
        ax.set_xlabel("step")
        ax.set_ylabel(plot.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(ax.get_lines()) > 8 else 1)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[name] = path
    return written


def _value_near(values: dict[int, float], step: int) -> float:
    """The finite value logged at `step` or the latest before it (a marker needs a height), else the largest."""
    before = [s for s, v in values.items() if s <= step and math.isfinite(v)]
    if before:
        return values[max(before)]
    return max((v for v in values.values() if math.isfinite(v)), default=0.0)


# ---------------------------------------------------------------------------------------------------- summary


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def strict_json(data: Any) -> str:
    """JSON that every parser reads: NaN and ±inf (which json.dumps writes as bare NaN/Infinity, not JSON) become
    null; allow_nan=False makes any that slipped through an error instead of a file others cannot read."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, default=str, allow_nan=False)


def _nats(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else _fmt(value)


def summary_table(summaries: dict[str, dict[str, object]]) -> str:
    """A markdown table, one row per run."""
    lines = [f"| run | steps | final train loss (mean of last {TRAIN_LOSS_WINDOW} logged) | min train loss (step) "
             "| final val loss | final val bpb | max attn logit (layer) | max output logit | spikes | diverged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in summaries.items():
        diverged = f"yes, at step {s['diverged_at']}" if s["diverged"] else "no"
        lines.append(
            f"| {label} | {s['steps']} | {_nats(s['final_train_loss'])} | {_nats(s['min_loss'])} "
            f"({_fmt(s['min_loss_step'])}) | {_nats(s['final_val_loss'])} | {_nats(s['final_val_bpb'])} "
            f"| {_fmt(s['max_attn_logit'])} ({_fmt(s['max_attn_logit_layer'])}) | {_fmt(s['max_output_logit'])} "
            f"| {s['spikes']} | {diverged} |")
    return "\n".join(lines)


def write_report(run_dirs: list[Path], out: Path) -> Path:
    runs = {_label(d, run_dirs): read_scalars(d) for d in run_dirs}
    thresholds = {_label(d, run_dirs): spike_threshold(d) for d in run_dirs}
    plots = plot_runs(runs, out, {label: value for label, (value, _) in thresholds.items()})
    summaries = {label: summarize_run(scalars) for label, scalars in runs.items()}
    missing = [PLOTS[name].title for name in PLOTS if name not in plots]
    text = ["# Training report", "", "Runs: " + ", ".join(f"`{d}`" for d in run_dirs), "",
            summary_table(summaries), "",
            f"Final train loss: the mean of the last {TRAIN_LOSS_WINDOW} logged training losses (each is one "
            "step's batch: one alone is noisy); final val loss and bpb: the last validation. Diverged: the training "
            f"loss ends NaN/inf or more than {DIVERGENCE_MARGIN} nats above its lowest value; the step given is "
            "where it left that range for good.", ""]
    if "spike_score" in plots:
        text += ["Spike threshold (dashed on the spike-score plot): " + "; ".join(
            f"{label} {value:g} ({source})" for label, (value, source) in thresholds.items()
            if SCORE_TAG in runs[label]) + ".", ""]
    text += [f"![{name}]({path.name})" for name, path in plots.items()]
    if missing:
        text += ["", "Not logged in these runs: " + "; ".join(missing) + "."]
    path = out / "summary.md"
    path.write_text("\n".join(text) + "\n")
    return path


def _label(run_dir: Path, all_dirs: list[Path]) -> str:
    """The run folder's name, or its path when two runs share a name."""
    names = [d.name for d in all_dirs]
    return run_dir.name if names.count(run_dir.name) == 1 else str(run_dir)


def is_sweep_dir(folder: Path) -> bool:
    """A folder made by `llmtrain sweep`: its manifest or spec copy at the top, or run results below it (a run
    folder has its own result.json at the top and is reported as a run)."""
    if (folder / "sweep.json").is_file() or (folder / "spec.yaml").is_file():
        return True
    return not (folder / "result.json").is_file() and any(folder.glob("*/**/result.json"))


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmtrain report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path,
                        help="run folders holding TensorBoard event files, or one sweep folder (llmtrain sweep)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/report)")
    parser.add_argument("--noise", type=Path, default=None, metavar="SWEEP_DIR",
                        help="a sweep of one config over several seeds (configs/ablations/seed_noise.yaml): its seed "
                             "spread gives verdicts to cells with fewer than 2 seeds")
    parser.add_argument("--curves", nargs="+", default=[], metavar="TAG",
                        help="sweep folders: also plot these TensorBoard tags over training per variant (e.g. "
                             "stability/weight_rms/global), besides the spec's `curves`")
    parser.add_argument("--baseline", default=None, metavar="VARIANT",
                        help="sweep folders: compare every variant with this one instead of the spec's baseline")
    args = parser.parse_args(argv)
    if args.noise is not None and not is_sweep_dir(args.noise):
        parser.error(f"--noise {args.noise}: not a sweep folder (made by `llmtrain sweep`)")
    out = args.out or args.run_dirs[0] / "report"
    try:
        if len(args.run_dirs) == 1 and is_sweep_dir(args.run_dirs[0]):
            from llmtrain.sweep_report import write_sweep_report

            summary = write_sweep_report(args.run_dirs[0], out, args.noise, tuple(args.curves), args.baseline)
        else:
            if args.noise is not None or args.curves or args.baseline:
                parser.error("--noise, --curves and --baseline apply to a sweep folder, not to run folders")
            summary = write_report(args.run_dirs, out)
    except (FileNotFoundError, ValueError) as error:
        print(f"llmtrain report: {error}", file=sys.stderr)
        return 1
    print(summary.read_text())
    print(f"wrote {out}")
    return 0
