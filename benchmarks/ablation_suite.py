"""The ablation suite (configs/ablations/*.yaml) on one GPU: many runs at once, each run once, reported under --out.

For each topic (a shipped spec) it writes a derived spec: the shipped variants, grid, match, baseline and LRs, the
first --seeds of the shipped seeds, and as base configs/ablations/base.yaml followed by a scale config that holds
only what the flags change (data_dir, and for another scale: model size, steps, micro-batch; --tiny: a CPU toy).
Warmup steps (the base's and norm_position's grid value) are scaled by steps / the base's steps, and d_ff values
given at the base width by d_model / the base width. Every run is its own `llmtrain sweep SPEC --index I` process
(a failed run does not stop the others); --parallel K of them share the GPU at once, in --order: seed-major (every
topic's seed-1 runs first) or topic-major (whole topics in --topics order); either way a suite cut short still holds
paired comparisons.

Each distinct run trains once. Runs of different topics with the same resolved settings (the base config is the
baseline of most topics) share the sweep fingerprint: the first one trains and the others receive a copy of its
folder. `--reuse DIR ...` does the same with the finished runs of earlier calls (their runs_<name>.tar.gz
unpacked), so a suite larger than one call continues where the last call stopped.

No run starts that would not end before --time_budget_s; runs still going then are stopped and reported as pending.
If the whole first wave fails, the rest is cancelled (a set-up error). Then `llmtrain report` of each sweep.

Only these files are written under --out:
  plan.md                    the scale, the budget arithmetic, the derived specs as a table
  summary.md                 plan, what ran, and every topic's report (markdown) one after another
  ablations_<name>.tar.gz    <topic>/summary.md and PNGs, specs/, plan.md, fit.log tails of failed runs
  runs_<name>.tar.gz         the sweep folders without checkpoints (sweep.json, result.json, config.yaml, events):
                             `llmtrain report <topic>` re-makes any report from them; `--reuse` reads them
  suite.log                  what the runner printed
The runs themselves stay in --work.

On one GPU (the exact calls of the recorded runs and their timings are in docs/ablations.md):
  python3 benchmarks/ablation_suite.py --out OUT [--reuse PREVIOUS/runs_*]
CPU smoke test (toy size, fp32, a handful of steps):
  python benchmarks/ablation_suite.py --tiny --topics weight_decay --data_dir .abl_data/corpus/shards --out /tmp/abl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from llmtrain.sweep import (SpecError, SweepSpec, expand_grid, expand_runs, read_result,  # noqa: E402
                            write_json, write_manifest)

ABLATIONS = REPO / "configs" / "ablations"
BASE = ABLATIONS / "base.yaml"
RESULTS = ("finished", "diverged")  # run statuses that are results (the others: failed, or no result at all)
SEED_NOISE = "seed_noise"  # the base alone over 4 seeds: the spread single-seed comparisons are read against
# In the order they run (a suite cut short by its time budget loses the last): the stability questions first (their
# high-LR baselines are shared), then the components, the slow deep runs of aspect_ratio last.
TOPICS = ("qk_norm", "z_loss", "softcap", "norm_position", "ffn_activation", "position", "norm_type", "bias",
          "weight_decay", "heads", "ffn_ratio", "aspect_ratio")
GROUPS = {"all": TOPICS}
CONCURRENCY_NOTE = ("tokens/s and wall times were measured with up to {k} runs sharing one GPU: they depend on what "
                    "ran beside each run and do not compare the variants' speed.")


def shipped_base() -> dict[str, Any]:
    """configs/ablations/base.yaml: what steps, warmups and widths scale from."""
    return yaml.safe_load(BASE.read_text())


# ---------------------------------------------------------------------------------------------- the scale


@dataclass
class Scale:
    """What the flags change in the shipped base; None keeps the base's value."""
    data_dir: Path
    vocab_size: int
    steps: Optional[int] = None
    micro_batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    d_model: Optional[int] = None
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    val_points: Optional[int] = None
    val_batches: Optional[int] = None
    compile: Optional[str] = None
    tiny: bool = False

    def __post_init__(self) -> None:
        self.base = shipped_base()
        self.base_steps = int(self.base["trainer"]["max_steps"])
        self.base_width = int(self.base["model"]["config"]["d_model"])
        self.resolved = {  # the values runs get: the flag's, else the base's
            "steps": self.steps or self.base_steps, "d_model": self.d_model or self.base_width,
            "micro_batch_size": self.micro_batch_size or self.base["data"]["micro_batch_size"],
            "seq_len": self.seq_len or self.base["data"]["seq_len"]}

    @property
    def tokens(self) -> int:
        r = self.resolved
        return r["steps"] * r["micro_batch_size"] * r["seq_len"]

    def warmup(self, base_value: int) -> int:
        """A warmup of the base's steps scaled to these steps (a nonzero warmup stays >= 1 step)."""
        if self.steps is None:
            return base_value
        return 0 if base_value == 0 else max(1, round(base_value * self.steps / self.base_steps))

    def width(self, d_ff_at_base: int) -> int:
        """A d_ff given at the base width, at this d_model (multiples of 8)."""
        if self.d_model is None:
            return d_ff_at_base
        return max(8, 8 * round(d_ff_at_base * self.d_model / self.base_width / 8))

    def config(self) -> dict[str, Any]:
        """The fit config applied after base.yaml (`--config base.yaml --config scale.yaml`): only what changes, so
        that a run's fingerprint does not depend on the folder the suite ran in (the data path is kept relative to
        the repository where it lies inside it; runs start there)."""
        data_dir = self.data_dir.resolve()
        data: dict[str, Any] = {"data_dir": os.path.relpath(data_dir, REPO) if data_dir.is_relative_to(REPO)
                                else str(data_dir)}
        model: dict[str, Any] = {"config": {"vocab_size": self.vocab_size}}
        trainer: dict[str, Any] = {}
        for key, value in (("d_model", self.d_model), ("n_layer", self.n_layer), ("n_head", self.n_head)):
            if value is not None:
                model["config"][key] = value
        if self.d_model is not None:  # the base's d_ff, at the new width
            base_d_ff = self.base["model"]["config"].get("d_ff")
            if base_d_ff:
                model["config"]["d_ff"] = self.width(int(base_d_ff))
        if self.seq_len is not None:
            model["config"]["max_seq_len"] = data["seq_len"] = self.seq_len
        if self.micro_batch_size is not None:
            data["micro_batch_size"] = self.micro_batch_size
        if self.steps is not None:
            trainer["max_steps"] = self.steps
            model["optim"] = {"warmup_steps": self.warmup(int(self.base["model"]["optim"]["warmup_steps"]))}
        if self.val_points is not None:
            trainer["val_check_interval"] = self.resolved["steps"] // self.val_points
        if self.val_batches is not None:
            trainer["limit_val_batches"] = self.val_batches
        if self.compile is not None:
            model["compile"] = self.compile
        if self.tiny:
            trainer.update(accelerator="cpu", precision="32-true", log_every_n_steps=1)
            data["num_workers"] = 0
        return {"trainer": trainer, "model": model, "data": data} if trainer else {"model": model, "data": data}


def shards_vocab(data_dir: Path) -> tuple[int, dict[str, Any]]:
    meta_path = data_dir / "metadata.json"
    if not meta_path.is_file():
        raise SystemExit(f"error: --data_dir {data_dir}: no metadata.json (prepare shards with `llmtrain prepare`, "
                         "see docs/ablations.md, GPU run: how)")
    meta = json.loads(meta_path.read_text())
    if not meta.get("complete"):
        raise SystemExit(f"error: --data_dir {data_dir}: the shards are incomplete (metadata.json complete=false)")
    return int(meta["settings"]["vocab_size"]), meta


# ---------------------------------------------------------------------------------------------- the specs


@dataclass
class Topic:
    name: str
    spec_path: Path  # the derived spec
    sweep_dir: Path
    spec: SweepSpec
    runs: list  # llmtrain.sweep.Run
    shipped: dict[str, Any]
    changes: list[str] = field(default_factory=list)


def scale_overrides(overrides: dict[str, Any], scale: Scale, where: str, changes: list[str]) -> dict[str, Any]:
    out = dict(overrides)
    for key, value in overrides.items():
        if key == "model.optim.warmup_steps":
            out[key] = scale.warmup(int(value))
        elif key == "model.config.d_ff":
            out[key] = scale.width(int(value))
        if out[key] != value:
            changes.append(f"{where}.{key}: {value} -> {out[key]}")
    return out


def select(spec: dict[str, Any], topic: str, variants: list[tuple[str, str]],
           lrs: list[tuple[Optional[str], float]]) -> dict[str, Any]:
    """The spec restricted to the variants named in `variants`, (topic, variant) pairs (its baseline always kept; a
    topic none of them names keeps all), and to the LRs of its grid in `lrs`: (None, lr) for every topic, (topic,
    lr) for that one (a topic without an LR grid keeps the base's; one that no item concerns keeps its grid)."""
    wanted = [variant for named, variant in variants if named == topic]
    if wanted:
        named = spec["variants"] if "variants" in spec else expand_grid(spec.pop("grid"))
        baseline = spec.get("baseline", next(iter(named)))
        unknown = [v for v in wanted if v not in named]
        if unknown:
            raise SystemExit(f"error: --variants {topic}:{unknown[0]}: not a variant of {topic}; its variants: "
                             f"{', '.join(named)}")
        spec["variants"] = {v: o for v, o in named.items() if v == baseline or v in wanted}
        spec["baseline"] = baseline
    mine = [lr for named, lr in lrs if named in (None, topic)]
    if mine and spec.get("lrs"):
        kept = [lr for lr in spec["lrs"] if any(math.isclose(float(lr), x, rel_tol=1e-6) for x in mine)]
        if not kept:
            raise SystemExit(f"error: --lrs {' '.join(f'{x:g}' for x in mine)}: none of {topic}'s LRs "
                             f"({', '.join(f'{float(lr):g}' for lr in spec['lrs'])})")
        spec["lrs"] = kept
    return spec


def derive_spec(name: str, scale: Scale, n_seeds: int, scale_path: Path, work: Path,
                variants: tuple[tuple[str, str], ...] = (),
                lrs: tuple[tuple[Optional[str], float], ...] = ()) -> Topic:
    shipped_path = ABLATIONS / f"{name}.yaml"
    shipped = yaml.safe_load(shipped_path.read_text())
    spec = dict(shipped)
    changes: list[str] = []
    spec["base"] = [str(BASE), str(scale_path)]
    extra = range(max(shipped["seeds"]) + 1, max(shipped["seeds"]) + 1 + n_seeds)  # more seeds than shipped
    # The seed-noise topic keeps all its seeds: the spread it measures is what every other topic is read against.
    spec["seeds"] = shipped["seeds"] if name == SEED_NOISE else (shipped["seeds"] + list(extra))[:n_seeds]
    if "overrides" in spec:
        spec["overrides"] = scale_overrides(spec["overrides"], scale, "overrides", changes)
    if "variants" in spec:
        spec["variants"] = {v: scale_overrides(o or {}, scale, f"variants.{v}", changes)
                            for v, o in spec["variants"].items()}
    if "grid" in spec:
        grid = {}
        for key, values in spec["grid"].items():
            grid[key] = [scale_overrides({key: v}, scale, "grid", changes)[key] for v in values]
        spec["grid"] = grid
    spec = select(spec, name, list(variants), list(lrs))
    scaled = f"; scaled: {'; '.join(changes)}" if changes else ""
    spec["description"] = (str(shipped.get("description", "")).strip()
                           + f" [benchmarks/ablation_suite.py: {scale.tokens:,} tokens per run{scaled}.]")
    path = work / "specs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    try:
        loaded = SweepSpec.load(path)
        runs = expand_runs(loaded)
    except SpecError as error:
        raise SystemExit(f"error: derived spec of {name}: {error}") from None
    return Topic(name, path, work / "sweeps" / name, loaded, runs, shipped, changes)


def resolve_topics(given: list[str]) -> list[str]:
    names: list[str] = []
    for item in given:
        for name in GROUPS.get(item, (item,)):
            if name not in (*TOPICS, SEED_NOISE):
                raise SystemExit(f"error: --topics {item!r}: not a spec of configs/ablations; choose from "
                                 f"{', '.join(TOPICS)}, {SEED_NOISE} or a group ({', '.join(GROUPS)})")
            if name not in names:
                names.append(name)
    return names


# ---------------------------------------------------------------------------------------------- the plan


def estimate(n_runs: int, tokens: int, parallel: int, tokens_per_s: float, overhead_s: float) -> tuple[float, float]:
    """(seconds per run, seconds for all runs). Runs at once share `tokens_per_s`; a run's start-up and teardown
    (CPU) overlap with the others' training, so the GPU work bounds the total unless start-ups dominate."""
    at_once = min(parallel, n_runs)
    per_run = overhead_s + tokens * at_once / tokens_per_s
    total = max(n_runs * tokens / tokens_per_s, math.ceil(n_runs / parallel) * overhead_s) + overhead_s
    return per_run, total


def plan_markdown(topics: list[Topic], scale: Scale, args: argparse.Namespace, meta: dict[str, Any]) -> str:
    n_runs = sum(len(t.runs) for t in topics)
    distinct = len({r.fingerprint for t in topics for r in t.runs})
    per_run, total = estimate(distinct, scale.tokens, args.parallel, args.assumed_tokens_per_s,
                              args.assumed_overhead_s)
    first = topics[0].runs[0]
    base = topics[0].spec.base_config
    splits = meta["splits"]
    shape = first.shape
    steps = scale.resolved["steps"]
    lines = [
        f"# Ablation suite plan: {args.name}", "",
        f"- Data: `{scale.data_dir}`: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens, "
        f"vocab {scale.vocab_size}",
        f"- Model (base shape): d_model {shape['d_model']}, {shape['n_layer']} layers, {shape['n_head']} heads, "
        f"d_ff {shape['d_ff']}, vocab {scale.vocab_size}, sequence {scale.resolved['seq_len']}: "
        f"N = {first.params / 1e6:.2f}M non-embedding, {first.params_total / 1e6:.2f}M in all, "
        f"{first.flops_per_token / 1e6:.0f} MFLOP per token; compile {base['model'].get('compile', 'off')}"
        + ("; CPU, fp32 (--tiny)" if scale.tiny else ""),
        f"- Per run: {steps} steps x {scale.resolved['micro_batch_size']} x {scale.resolved['seq_len']} = "
        f"{scale.tokens:,} tokens ({scale.tokens / splits['train']['tokens']:.2f} epochs of the train split, "
        f"{scale.tokens / first.params:.1f} tokens per non-embedding parameter); warmup "
        f"{base['model']['optim']['warmup_steps']} steps; validation every {base['trainer']['val_check_interval']} "
        f"steps on at most {base['trainer']['limit_val_batches']} batches",
        f"- Runs: {n_runs} ({len(topics)} topics), {distinct} distinct (runs with the same settings in several "
        f"topics train once), {args.parallel} at a time; {distinct * scale.tokens / 1e9:.2f}B tokens to train",
        f"- Estimate (assumed {args.assumed_tokens_per_s / 1e6:.2f}M tokens/s over all concurrent runs, "
        f"{args.assumed_tokens_per_s * first.flops_per_token / 1e12:.0f} TFLOP/s of model FLOPs, "
        f"{args.assumed_overhead_s:.0f} s start-up per run; runs reused from earlier calls not counted): "
        f"{per_run:.0f} s per run, {total / 60:.1f} min in all; time budget {args.time_budget_s:.0f} s (runs that "
        f"would not end by then are not started)",
        f"- {CONCURRENCY_NOTE.format(k=args.parallel)}", "",
        "| topic | variants | LRs | seeds (shipped -> run) | runs (shipped -> run) | scaled values |",
        "|---|---|---|---|---|---|"]
    for t in topics:
        shipped_variants = len(t.shipped["variants"]) if "variants" in t.shipped else \
            math.prod(len(values) for values in t.shipped["grid"].values())
        shipped_runs = shipped_variants * len(t.shipped.get("lrs") or [None]) * len(t.shipped["seeds"])
        lrs = ", ".join(f"{lr:g}" for lr in t.spec.lrs) or "base"
        lines.append(f"| {t.name} | {len(t.spec.variants)} | {lrs} | {t.shipped['seeds']} -> {t.spec.seeds} "
                     f"| {shipped_runs} -> {len(t.runs)} | {'; '.join(t.changes) or '-'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Job:
    topic: Topic
    run: Any  # llmtrain.sweep.Run
    process: Optional[subprocess.Popen] = None
    started: float = 0.0
    ended: float = 0.0
    state: str = "queued"  # queued | running | done | copied | stopped | not started | cancelled
    copies: list["Job"] = field(default_factory=list)  # jobs of other topics with the same settings

    @property
    def folder(self) -> Path:
        return self.topic.sweep_dir / self.run.key


def ordered(topics: list[Topic], order: str) -> list[Job]:
    """Every run as a job, in the order they start. The seed-noise runs come first. `seed`: every topic's runs of
    the first seed, then of the second, ... (a cut-short suite holds paired seeds of every topic); `topic`: one
    topic after another, each seed by seed (a cut-short suite holds whole topics)."""
    jobs = [Job(t, r) for t in topics for r in t.runs]
    seeds = sorted({j.run.seed for j in jobs}, key=lambda s: min(t.spec.seeds.index(s) for t in topics
                                                                 if s in t.spec.seeds))

    def key(job: Job) -> tuple:
        seed, topic = seeds.index(job.run.seed), topics.index(job.topic)
        return (job.topic.name != SEED_NOISE, *((seed, topic) if order == "seed" else (topic, seed)), job.run.index)

    return sorted(jobs, key=key)


def distinct(jobs: list[Job]) -> list[Job]:
    """The jobs that train: the first of each fingerprint. The later ones become its copies (they receive its
    folder when it ends) and leave the queue."""
    first: dict[str, Job] = {}
    for job in jobs:
        if job.run.fingerprint in first:
            first[job.run.fingerprint].copies.append(job)
        else:
            first[job.run.fingerprint] = job
    return list(first.values())


def finished_runs(folders: list[Path]) -> dict[str, Path]:
    """fingerprint -> run folder, for every finished or diverged run under `folders` (earlier calls' sweeps)."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.rglob("result.json")):
            result = read_result(path.parent) or {}
            if result.get("status") in RESULTS and result.get("fingerprint"):
                found.setdefault(result["fingerprint"], path.parent)
    return found


def copy_run(source: Path, job: Job) -> str:
    """The run folder `source` (same fingerprint) as `job`'s run: its files without checkpoints, and a result.json
    that names this topic's variant, key and index. Returns the status copied."""
    target = job.folder
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "*.ckpt"))
    result = read_result(target) or {}
    result.update(index=job.run.index, key=job.run.key, variant=job.run.variant, lr=job.run.lr,
                  overrides=job.run.overrides, copied_from=str(source))
    write_json(target / "result.json", result)
    job.state = "copied"
    return result.get("status", "?")


def start(job: Job, log_dir: Path, threads: int) -> None:
    command = [sys.executable, "-m", "llmtrain.cli", "sweep", str(job.topic.spec_path), "--out",
               str(job.topic.sweep_dir), "--index", str(job.run.index)]
    log = log_dir / f"{job.topic.name}.{job.run.index:03d}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        job.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                       start_new_session=True)  # its own group: stopped with its fit child
    job.started, job.state = time.time(), "running"


def stop(jobs: list[Job], grace_s: float = 15.0, state: str = "stopped") -> None:
    """SIGTERM to each run's process group (the sweep process and its fit) at once, SIGKILL to those left after
    `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for job in jobs:
            if job.process.poll() is None:
                try:
                    os.killpg(job.process.pid, sig)
                except ProcessLookupError:
                    pass
        end = time.time() + grace_s
        while time.time() < end and any(j.process.poll() is None for j in jobs):
            time.sleep(0.2)
    for job in jobs:
        job.ended, job.state = time.time(), state


def fits(at_once: int, expected: float, left: float, args: argparse.Namespace) -> bool:
    """Whether a run started now, one of `at_once` sharing the device, ends within `left` seconds. A run's time is
    its start-up (--assumed_overhead_s) plus training that slows in proportion to the runs at once, down to two:
    `expected` is the time of a run that shared the device with --parallel runs, and a run alone gets only about
    half of what a full wave does together (a base run: 1.92M tokens/s alone, 3.7M for 12 at once), not all of
    it. So when too little time is left for a full wave, a smaller one can still start: its runs train faster."""
    overhead = min(args.assumed_overhead_s, expected)
    share = min(1.0, max(at_once, 2) / args.parallel)
    return overhead + (expected - overhead) * share <= left


def run_jobs(jobs: list[Job], args: argparse.Namespace, scale: Scale, log: TextIO, on_topic_done) -> None:
    t0 = time.time()
    deadline = t0 + args.time_budget_s
    prior, _ = estimate(len({j.run.fingerprint for j in jobs}), scale.tokens, args.parallel,
                        args.assumed_tokens_per_s, args.assumed_overhead_s)
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    log_dir = args.work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    queue = [j for j in distinct(jobs) if j.state == "queued"]  # reused runs are in already
    first_wave = min(args.parallel, len(queue))
    running: list[Job] = []
    finished_walls: list[float] = []
    statuses: list[str] = []  # of the runs ended so far

    def report_settled(candidates: list[Job]) -> None:
        """Settles the copies of `candidates` (a copy of the run if it is a result, else the same state), then
        reports each topic of theirs whose runs have all ended, been stopped or been left out."""
        for job in candidates:
            for copy in (c for c in job.copies if c.state == "queued"):
                if job.state == "done" and (read_result(job.folder) or {}).get("status") in RESULTS:
                    say(log, f"  {copy.topic.name} {copy.run.key}: {copy_run(job.folder, copy)} (the run of "
                             f"{job.topic.name} {job.run.key}: same settings)")
                else:
                    copy.state = job.state
        candidates = candidates + [c for j in candidates for c in j.copies]
        for topic in {j.topic.name: j.topic for j in candidates}.values():
            if all(j.state not in ("queued", "running") for j in jobs if j.topic is topic):
                on_topic_done(topic)

    while queue or running:
        for job in [j for j in running if j.process.poll() is not None]:
            running.remove(job)
            job.ended, job.state = time.time(), "done"
            finished_walls.append(job.ended - job.started)
            result = read_result(job.folder) or {}
            status = result.get("status", f"no result (exit {job.process.returncode})")
            if status in RESULTS:  # its end-of-run checkpoint is not needed
                shutil.rmtree(job.folder / "checkpoints", ignore_errors=True)
            say(log, f"  {job.topic.name} {job.run.key}: {status} (started +{job.started - t0:.0f} s, "
                     f"took {job.ended - job.started:.0f} s)")
            statuses.append(status)
            report_settled([job])
        got_through = any(status in RESULTS for status in statuses)
        if statuses and len(statuses) >= first_wave and not got_through:
            # No run of the first wave got through: a set-up error (a missing package, bad data) that every other
            # run would repeat. Stop now rather than spend the budget on it.
            say(log, f"the first {len(statuses)} runs all failed: stopping the suite (see fit.log of any run)")
            for job in queue:
                job.state = "cancelled"
            queue.clear()
            stop(running, state="cancelled")
            running.clear()
            report_settled(jobs)
            return
        # Observed run time once a few runs are in, else the assumed one. The median of runs that shared the device
        # with `parallel` others is already an upper bound for a run started while fewer remain.
        expected = statistics.median(finished_walls) if len(finished_walls) >= 2 else prior
        # While every run that ended so far has failed, the first wave is undecided: start nothing new until a run
        # gets through or the whole wave has failed (then the suite stops above).
        undecided = bool(statuses) and not got_through
        while queue and len(running) < args.parallel and not undecided:
            if not fits(len(running) + 1, expected, deadline - time.time(), args):
                if running and fits(1, expected, deadline - time.time(), args):
                    break  # a smaller wave may fit once the running ones end
                for job in queue:
                    job.state = "not started"
                say(log, f"time budget: {len(queue)} runs not started (each would take ~{expected:.0f} s, "
                         f"{max(0, deadline - time.time()):.0f} s left)")
                left, queue[:] = list(queue), []
                report_settled(left)
                break
            job = queue.pop(0)
            start(job, log_dir, threads)
            running.append(job)
        if running and time.time() > deadline:
            say(log, f"time budget reached: stopping {len(running)} runs (reported as pending)")
            stop(running)
            stopped, running[:] = list(running), []
            report_settled(stopped)
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------- reports


REPORT_CODE = """
import sys
from pathlib import Path
import llmtrain.sweep_report as sweep_report
try:
    import matplotlib  # noqa: F401
except ImportError:  # the markdown is what matters; the event files travel in runs_*.tar.gz for plots elsewhere
    print("matplotlib is not installed: report without plots")
    sweep_report.plot_sweep = lambda *args, **kwargs: {}
sweep_report.write_sweep_report(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if sys.argv[3:] else None)
"""


class Reports:
    """`llmtrain report` of each sweep in a background process (a finished topic's report is made while other
    topics' runs go on), into WORK/reports/<topic>/. Once the seed-noise sweep has 2 finished runs, the other
    topics' verdicts are read against its spread (`llmtrain report --noise`)."""

    def __init__(self, folder: Path, log: TextIO, noise_dir: Optional[Path]) -> None:
        self.folder, self.log, self.noise_dir = folder, log, noise_dir
        self.pending: dict[str, subprocess.Popen] = {}

    def noise_for(self, topic: Topic) -> list[str]:
        if topic.name == SEED_NOISE or self.noise_dir is None:
            return []
        results = [read_result(path.parent) or {} for path in self.noise_dir.glob("*/**/result.json")]
        return [str(self.noise_dir)] if sum(r.get("status") == "finished" for r in results) >= 2 else []

    def start(self, topic: Topic) -> None:
        self.wait(topic.name)  # a report of the same topic still being written finishes first
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", ""))
                                                            if p)}
        self.pending[topic.name] = subprocess.Popen(
            [sys.executable, "-c", REPORT_CODE, str(topic.sweep_dir), str(self.folder / topic.name),
             *self.noise_for(topic)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)

    def wait(self, name: Optional[str] = None) -> None:
        for topic in [name] if name else list(self.pending):
            process = self.pending.pop(topic, None)
            if process is None:
                continue
            output, _ = process.communicate()
            if process.returncode != 0:
                say(self.log, f"report of {topic} failed ({process.returncode}):\n{output[-3000:]}")
            else:
                say(self.log, f"report: {self.folder / topic / 'summary.md'}")


def runs_summary(topics: list[Topic], jobs: list[Job]) -> str:
    counts: dict[str, int] = {}
    for topic in topics:
        for run in topic.runs:
            status = (read_result(topic.sweep_dir / run.key) or {}).get("status", "pending")
            counts[status] = counts.get(status, 0) + 1
    stopped = [f"{j.topic.name}/{j.run.key}" for j in jobs if j.state == "stopped"]
    skipped = sum(j.state == "not started" for j in jobs)
    cancelled = sum(j.state == "cancelled" for j in jobs)
    lines = ["## What ran", "", "- " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    if stopped:
        lines.append(f"- Stopped at the time budget (pending in the reports): {', '.join(stopped)}")
    if skipped:
        lines.append(f"- Not started (the time budget would not have held them): {skipped}")
    if cancelled:
        lines.append(f"- Cancelled: {cancelled}, because the first wave of runs all failed (a set-up error every run "
                     "would repeat; see the failed runs' fit.log)")
    return "\n".join(lines) + "\n"


def summary_markdown(plan: str, topics: list[Topic], jobs: list[Job], reports: Path, k: int) -> str:
    parts = [plan, runs_summary(topics, jobs)]
    for topic in topics:
        path = reports / topic.name / "summary.md"
        if not path.is_file():
            parts.append(f"# {topic.name}: no report (see suite.log)\n")
            continue
        text = path.read_text()
        for png in sorted((reports / topic.name).glob("*.png")):  # images sit in <topic>/ inside the tarball
            text = text.replace(f"]({png.name})", f"]({topic.name}/{png.name})")
        parts.append(text.replace("# Sweep report:", "# Topic:", 1)
                     + f"\n_{CONCURRENCY_NOTE.format(k=k)}_\n")
    return "\n".join(parts)


def failed_log_tails(topics: list[Topic], lines: int = 80) -> dict[str, str]:
    tails = {}
    for topic in topics:
        for run in topic.runs:
            result = read_result(topic.sweep_dir / run.key)
            log = topic.sweep_dir / run.key / "fit.log"
            if result and result.get("status") == "failed" and log.is_file():
                text = log.read_text(errors="replace").splitlines()[-lines:]
                tails[f"failed_logs/{topic.name}/{run.key.replace('/', '_')}.log"] = "\n".join(text) + "\n"
    return tails


def pack(out: Path, name: str, topics: list[Topic], reports: Path, work: Path, extra: dict[str, str]) -> None:
    """ablations_<name>.tar.gz (reports, specs, plan, failed logs) and runs_<name>.tar.gz (sweep folders, no
    checkpoints); each written to a temporary name first, so a kill mid-write leaves the previous one."""
    def add_text(tar: tarfile.TarFile, arcname: str, text: str) -> None:
        tmp = work / ".pack.tmp"
        tmp.write_text(text)
        tar.add(tmp, arcname=arcname)

    tmp = out / f".ablations_{name}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for topic in topics:
            if (reports / topic.name).is_dir():
                tar.add(reports / topic.name, arcname=f"ablations_{name}/{topic.name}")
            tar.add(topic.spec_path, arcname=f"ablations_{name}/specs/{topic.name}.yaml")
        tar.add(work / "specs" / "scale.yaml", arcname=f"ablations_{name}/specs/scale.yaml")
        for arcname, text in extra.items():
            add_text(tar, f"ablations_{name}/{arcname}", text)
    tmp.replace(out / f"ablations_{name}.tar.gz")

    tmp = out / f".runs_{name}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for topic in topics:
            if topic.sweep_dir.is_dir():
                tar.add(topic.sweep_dir, arcname=f"runs_{name}/{topic.name}",
                        filter=lambda info: None if "/checkpoints" in info.name or info.name.endswith(".ckpt")
                        else info)
    tmp.replace(out / f"runs_{name}.tar.gz")


def say(log: TextIO, message: str) -> None:
    print(message, flush=True)
    log.write(message + "\n")
    log.flush()


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=REPO / ".abl_data" / "corpus" / "shards",
                        help="token shards (llmtrain prepare) with metadata.json (default: the base's)")
    parser.add_argument("--topics", nargs="+", default=["all"],
                        help=f"spec names ({SEED_NOISE} too) or groups: "
                             + "; ".join(f"{g} = {' '.join(t)}" for g, t in GROUPS.items()))
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_out" / "ablations", help="reports (5 files)")
    parser.add_argument("--work", type=Path, default=None,
                        help="derived specs, sweeps, run logs, reports (default runs/ablation_suite/<name>)")
    parser.add_argument("--name", default=None, help="names the tarballs (default: the group or 'custom')")
    parser.add_argument("--order", choices=("seed", "topic"), default="seed",
                        help="seed (default): every topic's first seed, then the second, ...; topic: whole topics one "
                             "after another, in --topics order")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[],
                        help="folders of earlier calls' runs (runs_<name>.tar.gz unpacked): a run with the same "
                             "fingerprint found there is copied, not trained")
    parser.add_argument("--variants", nargs="+", default=[], metavar="TOPIC:VARIANT",
                        help="run only these variants of their topics (each topic's baseline is kept; topics not "
                             "named keep all), e.g. qk_norm:qk_norm 'norm_position:norm_position=post,warmup_steps=75'")
    parser.add_argument("--lrs", nargs="+", default=[], metavar="[TOPIC:]LR",
                        help="run only these LRs of the topics that have an LR grid; TOPIC:LR for one topic (a topic "
                             "no item names keeps its grid), e.g. qk_norm:3e-2 norm_position:3e-3")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default: the base's; --tiny 6)")
    parser.add_argument("--micro_batch_size", type=int, default=None,
                        help="sequences per step (default: the base's; --tiny 4)")
    parser.add_argument("--seq_len", type=int, default=None,
                        help="tokens per sequence (default: the base's; --tiny 64)")
    parser.add_argument("--d_model", type=int, default=None, help="base width (default: the base's; --tiny 64)")
    parser.add_argument("--n_layer", type=int, default=None, help="base depth (default: the base's; --tiny 2)")
    parser.add_argument("--n_head", type=int, default=None, help="base heads (default: the base's; --tiny 2)")
    parser.add_argument("--vocab_size", type=int, default=None, help="must match the shards (default: theirs)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="the first N of each spec's seeds (default 3; --tiny 1; seed_noise keeps all its seeds)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="runs at once on the one device (default 8; --tiny 2)")
    parser.add_argument("--val_points", type=int, default=None,
                        help="validations per run, the last at the last step (default: the base's; --tiny 2)")
    parser.add_argument("--val_batches", type=int, default=None, help="limit_val_batches (default: the base's)")
    parser.add_argument("--compile", choices=("off", "model"), default=None, help="default: the base's")
    parser.add_argument("--time_budget_s", type=float, default=450.0,
                        help="no run starts that would end later; runs still going then are stopped (default 450: "
                             "with start-up, reports and packing a call stays under 10 minutes)")
    parser.add_argument("--assumed_tflops", type=float, default=185.0,
                        help="for the estimate until runs have ended: model TFLOP/s of the GPU over all concurrent "
                             "runs, turned into tokens/s by the model's FLOPs per token, so that it carries over to "
                             "another scale (default 185: 12 runs of the shipped base on one H200, 3.7M tokens/s)")
    parser.add_argument("--assumed_tokens_per_s", type=float, default=None,
                        help="the same as training tokens/s over all concurrent runs (overrides --assumed_tflops)")
    parser.add_argument("--assumed_overhead_s", type=float, default=40.0,
                        help="for the estimate: start-up, compile, validation and teardown per run (default 40 s)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode: toy size, fp32, no compile, 6 steps")
    parser.add_argument("--dry_run", action="store_true", help="write the specs and plan.md, print them; run nothing")
    args = parser.parse_args(argv)
    defaults = dict(seeds=3, parallel=8)
    if args.tiny:
        defaults = dict(steps=6, micro_batch_size=4, seq_len=64, d_model=64, n_layer=2, n_head=2, seeds=1,
                        parallel=2, val_points=2, compile="off")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "micro_batch_size", "seq_len", "d_model", "n_layer", "n_head", "seeds", "parallel",
                "val_points", "val_batches"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key} {getattr(args, key)}: must be >= 1")
    if args.val_points and (args.steps or shipped_base()["trainer"]["max_steps"]) % args.val_points:
        parser.error(f"the steps are not a multiple of --val_points {args.val_points}: the last validation must "
                     "fall on the last step (the report's final val loss)")
    if args.tiny and args.compile != "off":
        parser.error("--tiny runs on CPU without compile; drop --compile")
    for folder in args.reuse:
        if not folder.is_dir():
            parser.error(f"--reuse {folder}: not a folder (give the unpacked runs_<name> of an earlier call)")
    args.topics = resolve_topics(args.topics)
    for item in args.variants:
        if ":" not in item or item.split(":", 1)[0] not in args.topics:
            parser.error(f"--variants {item!r}: give TOPIC:VARIANT with a topic of --topics ({', '.join(args.topics)})")
    args.variants = [tuple(item.split(":", 1)) for item in args.variants]  # (topic, variant)
    args.lrs = [parse_lr(item, args.topics, parser) for item in args.lrs]
    args.name = args.name or next((g for g, t in GROUPS.items() if list(t) == args.topics), "custom")
    if args.work is None:
        args.work = REPO / "runs" / "ablation_suite" / args.name
    args.out, args.work = args.out.resolve(), args.work.resolve()
    return args


def parse_lr(item: str, topics: list[str], parser: argparse.ArgumentParser) -> tuple[Optional[str], float]:
    """An --lrs item: 'LR' for every topic or 'TOPIC:LR' for one, as (topic or None, lr)."""
    topic, _, value = item.rpartition(":")
    if topic and topic not in topics:
        parser.error(f"--lrs {item!r}: {topic!r} is not a topic of --topics ({', '.join(topics)})")
    try:
        lr = float(value)
    except ValueError:
        lr = math.nan
    if not 0 < lr < math.inf:
        parser.error(f"--lrs {item!r}: give a positive learning rate, or TOPIC:LR (e.g. qk_norm:3e-2)")
    return topic or None, lr


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    vocab, meta = shards_vocab(args.data_dir)
    if args.vocab_size is not None and args.vocab_size != vocab:
        raise SystemExit(f"error: --vocab_size {args.vocab_size} does not match the shards in {args.data_dir} "
                         f"(vocab_size {vocab} in metadata.json)")
    scale = Scale(args.data_dir, vocab, args.steps, args.micro_batch_size, args.seq_len, args.d_model, args.n_layer,
                  args.n_head, args.val_points, args.val_batches, args.compile, args.tiny)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.work / "specs").mkdir(parents=True, exist_ok=True)
    scale_path = args.work / "specs" / "scale.yaml"
    scale_path.write_text("# benchmarks/ablation_suite.py: applied after configs/ablations/base.yaml\n"
                          + yaml.safe_dump(scale.config(), sort_keys=False))
    topics = [derive_spec(name, scale, args.seeds, scale_path, args.work, tuple(args.variants), tuple(args.lrs))
              for name in args.topics]
    if args.assumed_tokens_per_s is None:
        args.assumed_tokens_per_s = args.assumed_tflops * 1e12 / topics[0].runs[0].flops_per_token
    plan = plan_markdown(topics, scale, args, meta)
    (args.out / "plan.md").write_text(plan)
    with open(args.out / "suite.log", "a") as log:
        say(log, plan)
        if args.dry_run:
            return 0
        for topic in topics:
            write_manifest(topic.spec, topic.runs, topic.sweep_dir)  # unstarted runs show as pending
        reports = args.work / "reports"
        noise = next((t.sweep_dir for t in topics if t.name == SEED_NOISE), None)
        report_jobs = Reports(reports, log, noise)
        jobs = ordered(topics, args.order)
        reusable = finished_runs(args.reuse)
        for job in jobs:
            if job.run.fingerprint in reusable:
                copy_run(reusable[job.run.fingerprint], job)
        say(log, f"reused from earlier calls: {sum(j.state == 'copied' for j in jobs)} of {len(jobs)} runs")
        started = time.time()
        run_jobs(jobs, args, scale, log, report_jobs.start)
        say(log, f"runs: {time.time() - started:.0f} s")
        report_jobs.wait()
        for topic in topics:  # again, all of them: every verdict against the final seed noise
            report_jobs.start(topic)
        report_jobs.wait()
        summary = summary_markdown(plan, topics, jobs, reports, args.parallel)
        (args.out / "summary.md").write_text(summary)
        pack(args.out, args.name, topics, reports, args.work,
             {"plan.md": plan, "summary.md": summary, **failed_log_tails(topics)})
        say(log, f"wrote {args.out}: plan.md, summary.md, ablations_{args.name}.tar.gz, runs_{args.name}.tar.gz "
                 f"({time.time() - started:.0f} s)")
        failed = sum((read_result(t.sweep_dir / r.key) or {}).get("status") == "failed" for t in topics for r in t.runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
