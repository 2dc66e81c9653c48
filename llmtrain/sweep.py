"""`llmtrain sweep SPEC.yaml`: a base config x variants (x learning rates) x seeds -> one `llmtrain fit` run each.

A spec (YAML; the shipped ones are in configs/ablations/, the format is in docs/ablations.md):

    name: ffn_activation
    base: configs/ablations/base.yaml       # a fit config (or a list, applied in order): model, data, token budget
    overrides: {model.config.ffn: gelu, model.config.d_ff: 2048}   # dotted keys applied to every run
    seeds: [1, 2, 3]                        # the same seeds for every variant: seed s of A and of B share init
                                            # and data order (seed_everything = data.seed = s)
    lrs: [1.0e-3, 3.0e-3]                   # optional: every variant at every LR (LR sensitivity in the report)
    match: {quantity: params, by: model.config.d_ff}   # optional: size `by` so each variant has the count of
                                            # the base (+ overrides); quantity: params | params_total | flops
    baseline: gelu                          # the variant others are compared with (default: the first)
    curves: [stability/weight_rms/global]   # optional: tags the report plots over training per variant
    variants:                               # named variants, or `grid: {key: [values]}` for a cartesian product
      gelu: {model.config.ffn: gelu}
      swiglu: {model.config.ffn: swiglu}

Every run gets SWEEP_DIR/<variant>[/lr<lr>]/seed<seed>/ (TensorBoard events, config.yaml, fit.log, checkpoints)
and a result.json with its status: finished, diverged (with the step) or failed. A finished or diverged run is a
result and is skipped on re-run; a failed or interrupted one is run again (from its last checkpoint if it has one).
SWEEP_DIR/sweep.json lists every run; `llmtrain report SWEEP_DIR` reads both.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from llmtrain.config_files import merged, resolved_config
from llmtrain.model.config import ConfigError, ModelConfig

SPEC_KEYS = ("name", "description", "base", "overrides", "seeds", "lrs", "match", "baseline", "variants", "grid",
             "curves")
MATCHABLE = ("model.config.d_ff", "model.config.n_layer", "model.config.d_model")
# Set by the sweep for every run; a spec that sets them would break the pairing or the folder layout.
SET_BY_SWEEP = ("seed_everything", "data.seed", "trainer.logger", "ckpt_path")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*")
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # YAML 1.1 reads `1e-3` (no dot) as a string
TRAINING_DIVERGED = "TrainingDiverged"  # SpikeDetector stops a run that cannot recover with this exception


class SpecError(Exception):
    """A sweep spec that cannot work; the message names the spec file and the key."""


# --------------------------------------------------------------------------------------------- matched counts


def non_embedding_params(config: ModelConfig, seq_len: int) -> int:
    """Kaplan et al. 2020's N: every parameter but token/position embeddings and the LM head (they do not
    change with the block design, and dominate at small scale)."""
    return config.num_params(include_embedding=False) - config.vocab_size * config.d_model


MATCH_QUANTITIES: dict[str, Callable[[ModelConfig, int], int]] = {
    "params": non_embedding_params,
    "params_total": lambda config, seq_len: config.num_params(include_embedding=True),
    "flops": lambda config, seq_len: config.flops_per_token(seq_len),  # training FLOPs per token
}


def match_size(reference: dict[str, Any], variant: dict[str, Any], by: str, quantity: str,
               seq_len: int) -> tuple[dict[str, Any], int, int]:
    """Sizes model field `by` (d_ff, n_layer or d_model) so that `quantity` of the variant comes closest to the
    reference's. Returns (the fields to set, the variant's count, the reference's count).

    d_ff moves in steps of 8 (tensor-core friendly), n_layer in steps of 1. d_model keeps the head count (steps of
    2·n_head with RoPE, which rotates pairs; of 8 with an explicit head_dim) and scales d_ff with it, holding the
    ratio d_ff/d_model the variant has at its own width; d_ff then closes the rest of the gap (within ±25% of
    that ratio), so an aspect-ratio or FFN-ratio variant stays what it says and the counts match closely.
    """
    count = MATCH_QUANTITIES[quantity]
    target = count(ModelConfig(**reference), seq_len)
    merged = {**reference, **variant}

    def closest(candidates: list[dict[str, int]]) -> tuple[dict[str, int], int]:
        counts = [count(ModelConfig(**{**merged, **c}), seq_len) for c in candidates]
        best = min(range(len(candidates)), key=lambda i: abs(counts[i] - target))
        return candidates[best], counts[best]

    name = by.removeprefix("model.config.")
    if name == "d_ff":
        merged.pop("d_ff", None)
        width = ModelConfig(**merged).d_model
        sized, value = closest([{"d_ff": f} for f in range(8, 16 * width + 1, 8)])
    elif name == "n_layer":
        sized, value = closest([{"n_layer": n} for n in range(1, 257)])
    else:
        probe = ModelConfig(**merged)
        ratio = probe.d_ff / probe.d_model
        step = probe.n_head * (2 if probe.position == "rope" else 1) if merged.get("head_dim") is None else 8
        sized, _ = closest([{"d_model": d, "d_ff": 8 * max(1, round(ratio * d / 8))}
                            for d in range(step, 8 * probe.d_model + 1, step)])
        d = sized["d_model"]
        low, high = 8 * max(1, round(0.75 * ratio * d / 8)), round(1.25 * ratio * d)
        sized, value = closest([{"d_model": d, "d_ff": f} for f in range(low, high + 1, 8)])
    return {f"model.config.{k}": v for k, v in sized.items()}, value, target


# -------------------------------------------------------------------------------------------------- the spec


def expand_grid(grid: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """{key: [values]} -> named variants, one per combination, named `leaf=value,...` in the grid's order."""
    keys = list(grid)
    variants = {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, combo))
        if name in variants:
            raise SpecError(f"`grid`: two combinations are both named {name!r}; give `variants` with names instead")
        variants[name] = dict(zip(keys, combo))
    return variants


def _coerce(value: Any) -> Any:
    return float(value) if isinstance(value, str) and FLOAT.fullmatch(value) else value


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a nested config with dotted keys set (`model.config.d_ff: 1368`)."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return config


@dataclass
class SweepSpec:
    path: Path
    name: str
    base: list[Path]
    variants: dict[str, dict[str, Any]]
    seeds: list[int]
    lrs: list[float] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    match: dict[str, str] = field(default_factory=dict)  # {quantity, by}; empty: no matching
    baseline: str = ""
    description: str = ""
    curves: list[str] = field(default_factory=list)  # TensorBoard tags the report plots over training per variant
    base_config: dict[str, Any] = field(default_factory=dict)  # the base files merged

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SweepSpec":
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"sweep spec {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise SpecError(f"{path}: not valid YAML: {error}") from None

        def fail(key: str, message: str) -> SpecError:
            return SpecError(f"{path}: `{key}`: {message}")

        if not isinstance(raw, dict):
            raise SpecError(f"{path}: a spec is a mapping with keys {', '.join(SPEC_KEYS)}")
        unknown = sorted(set(raw) - set(SPEC_KEYS))
        if unknown:
            raise fail(unknown[0], f"unknown key; valid keys: {', '.join(SPEC_KEYS)}")
        for key in ("name", "base", "seeds"):
            if not raw.get(key):
                raise fail(key, "is required")
        if not isinstance(raw["name"], str) or not NAME.fullmatch(raw["name"]):
            raise fail("name", f"{raw['name']!r}: use letters, digits and . _ - (it names the sweep folder)")

        bases = raw["base"] if isinstance(raw["base"], list) else [raw["base"]]
        base_config: dict[str, Any] = {}
        for base in bases:
            if not Path(base).is_file():
                raise fail("base", f"config {base} does not exist (relative paths are from the current "
                                   "directory, the repository root)")
            base_config = merged(base_config, resolved_config(base))

        seeds = raw["seeds"]
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
                or len(set(seeds)) != len(seeds):
            raise fail("seeds", f"{seeds!r}: give a list of distinct integers, e.g. [1, 2, 3]")
        lrs = raw.get("lrs") or []
        try:
            lrs = [float(_coerce(lr)) for lr in lrs]
        except (TypeError, ValueError):
            raise fail("lrs", f"{raw.get('lrs')!r}: give a list of positive numbers, e.g. [1.0e-3, 3.0e-3]") from None
        if not all(lr > 0 and math.isfinite(lr) for lr in lrs) or len(set(lrs)) != len(lrs):
            raise fail("lrs", f"{lrs!r}: the learning rates must be distinct and > 0")

        if "grid" in raw and "variants" in raw:
            raise fail("grid", "give either `variants` or `grid`, not both")
        if "grid" in raw:
            grid = raw["grid"]
            if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
                raise fail("grid", "a mapping of dotted keys to non-empty lists of values")
            variants = expand_grid(grid)
            where = "grid"
        else:
            variants, where = raw.get("variants"), "variants"
            if not isinstance(variants, dict) or not variants:
                raise fail("variants", "is required: a mapping of variant names to overrides (or give `grid`)")
            variants = {name: dict(v or {}) for name, v in variants.items()}
        for name, overrides in variants.items():
            if not isinstance(name, str) or not NAME.fullmatch(name) or name == "report":
                raise fail(where, f"variant name {name!r}: use letters, digits and . _ - = , + (it names a folder; "
                                  "`report` is taken)")
            if not isinstance(overrides, dict):
                raise fail(f"variants.{name}", "a mapping of dotted keys to values")

        overrides = raw.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise fail("overrides", "a mapping of dotted keys to values")
        match = raw.get("match") or {}
        if match:
            if not isinstance(match, dict) or set(match) - {"quantity", "by"}:
                raise fail("match", f"{match!r}: give {{quantity: params|params_total|flops, by: "
                                    f"{'|'.join(MATCHABLE)}}}")
            match = {"quantity": match.get("quantity", "params"), "by": match.get("by")}
            if match["quantity"] not in MATCH_QUANTITIES:
                raise fail("match.quantity", f"{match['quantity']!r}: choose one of {', '.join(MATCH_QUANTITIES)}")
            if match["by"] not in MATCHABLE:
                raise fail("match.by", f"{match['by']!r}: choose one of {', '.join(MATCHABLE)}")
        curves = raw.get("curves") or []
        if not isinstance(curves, list) or not all(isinstance(c, str) and c.strip() for c in curves):
            raise fail("curves", f"{curves!r}: give a list of TensorBoard tags, e.g. [stability/weight_rms/global]")
        baseline = raw.get("baseline", next(iter(variants)))
        if baseline not in variants:
            raise fail("baseline", f"{baseline!r} is not a variant; variants: {', '.join(variants)}")

        spec = cls(path=path, name=raw["name"], base=[Path(b).resolve() for b in bases], variants=variants,
                   seeds=seeds, lrs=lrs, overrides=overrides, match=match, baseline=baseline,
                   description=str(raw.get("description", "")).strip(), curves=curves, base_config=base_config)
        spec._check_keys(fail)
        return spec

    def _check_keys(self, fail: Callable[[str, str], SpecError]) -> None:
        from llmtrain.training.optim import OptimConfig

        sections = {"model.config": {f.name for f in dataclasses.fields(ModelConfig)},
                    "model.optim": {f.name for f in dataclasses.fields(OptimConfig)}}
        places = [("overrides", self.overrides)] + [(f"variants.{n}", v) for n, v in self.variants.items()]
        for where, overrides in places:
            for key in overrides:
                if isinstance(key, str) and any(key == s or key.startswith(s + ".") for s in SET_BY_SWEEP):
                    raise fail(f"{where}.{key}", "is set by the sweep for every run (seeds: `seeds`; run folders: "
                                                 "--out); remove it")
                if not isinstance(key, str) or key.split(".")[0] not in ("model", "data", "trainer"):
                    raise fail(f"{where}.{key}", "override keys are dotted `llmtrain fit` keys under model., "
                                                 "data. or trainer. (e.g. model.config.d_ff)")
                if key == "model.optim.lr" and self.lrs:
                    raise fail(f"{where}.{key}", "conflicts with `lrs`, which sets the learning rate of every run")
                if self.match and key == self.match["by"] and where != "overrides":
                    raise fail(f"{where}.{key}", "is sized by `match.by`; a variant cannot also set it")
                section, _, leaf = key.rpartition(".")
                if section in sections and leaf not in sections[section]:
                    raise fail(f"{where}.{key}", f"{section} has no field {leaf!r}; fields: "
                                                 f"{', '.join(sorted(sections[section]))}")


# -------------------------------------------------------------------------------------------------- the runs


@dataclass
class Run:
    index: int
    variant: str
    seed: int
    lr: Optional[float]
    overrides: dict[str, Any]  # spec overrides, the variant's, the sized field: exactly what fit is given
    params: int  # non-embedding (Kaplan N)
    params_total: int
    flops_per_token: int
    tokens: Optional[int]  # the token budget: steps x global batch x sequence
    shape: dict[str, int]  # d_model, n_layer, n_head, d_ff as resolved (after sizing)
    fingerprint: str  # of the resolved settings: a finished run with another fingerprint is a different run

    @property
    def key(self) -> str:
        lr = f"/lr{self.lr:g}" if self.lr is not None else ""
        return f"{self.variant}{lr}/seed{self.seed}"


def _model_fields(config: dict[str, Any]) -> dict[str, Any]:
    return {k: _coerce(v) for k, v in ((config.get("model") or {}).get("config") or {}).items()}


def token_budget(config: dict[str, Any]) -> Optional[int]:
    """Tokens a run trains on: max_steps x seq_len x the global batch, which is data.global_batch_size where set,
    else micro-batch x accumulation x devices x nodes (None when the config leaves one open, e.g. devices: auto)."""
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    factors = [trainer.get("max_steps"), data.get("seq_len", 2048)]
    if data.get("global_batch_size") is not None:
        factors.append(data["global_batch_size"])
    else:
        factors += [data.get("micro_batch_size", 8), trainer.get("accumulate_grad_batches", 1),
                    trainer.get("devices", 1), trainer.get("num_nodes", 1)]
    if not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in factors):
        return None
    return math.prod(factors)


def resolved_settings(config: dict[str, Any], model: ModelConfig) -> dict[str, Any]:
    """The config with `model.config` as the model resolves it (d_ff and head_dim computed) less the fields at
    their defaults: two runs that differ only in how a setting is spelled (`qk_norm: false` given or left to its
    default, a d_ff given that the default would compute) get the same fingerprint, so a sweep runner can run them
    once; and a field added to ModelConfig later, at its default, leaves finished sweeps' fingerprints as they are."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    fields = {k: v for k, v in dataclasses.asdict(model).items() if v != defaults.get(k, dataclasses.MISSING)}
    return apply_overrides(config, {"model.config": fields})


def expand_runs(spec: SweepSpec) -> list[Run]:
    """Every run of the spec, numbered seed-major (all variants at the first seed come first, so an interrupted
    sweep already holds complete comparisons), then variant, then LR."""
    reference = apply_overrides(spec.base_config, spec.overrides)
    sized: dict[str, dict[str, Any]] = {}
    budgets: dict[str, Optional[int]] = {}
    for name, variant in spec.variants.items():
        overrides = {**spec.overrides, **variant}
        config = apply_overrides(spec.base_config, overrides)
        where = f"{spec.path}: variant {name!r}"
        try:
            if spec.match:
                seq_len = int((config.get("data") or {}).get("seq_len", 2048))
                fields, _, _ = match_size(_model_fields(reference), _model_fields(config), spec.match["by"],
                                          spec.match["quantity"], seq_len)
                overrides.update(fields)
            ModelConfig(**_model_fields(apply_overrides(spec.base_config, overrides)))
        except (ConfigError, TypeError) as error:
            raise SpecError(f"{where}: {error}") from None
        sized[name] = overrides
        budgets[name] = token_budget(apply_overrides(spec.base_config, overrides))
    if len(set(budgets.values())) > 1:
        raise SpecError(f"{spec.path}: the variants train on different token budgets "
                        f"({', '.join(f'{n}: {b}' for n, b in budgets.items())}); a comparison holds tokens equal "
                        "(trainer.max_steps x data.micro_batch_size x data.seq_len x accumulation x devices)")
    runs = []
    for seed, name, lr in itertools.product(spec.seeds, spec.variants, spec.lrs or [None]):
        overrides = dict(sized[name])
        config = apply_overrides(spec.base_config, overrides)
        if lr is not None:
            config = apply_overrides(config, {"model.optim.lr": lr})
        model = ModelConfig(**_model_fields(config))
        seq_len = int((config.get("data") or {}).get("seq_len", 2048))
        settings = json.dumps({"config": resolved_settings(config, model), "seed": seed}, sort_keys=True, default=str)
        runs.append(Run(len(runs), name, seed, lr, overrides, non_embedding_params(model, seq_len),
                        model.num_params(), model.flops_per_token(seq_len), budgets[name],
                        {k: getattr(model, k) for k in ("d_model", "n_layer", "n_head", "d_ff")},
                        hashlib.sha256(settings.encode()).hexdigest()[:16]))
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        shared = next(k for k in keys if keys.count(k) > 1)
        raise SpecError(f"{spec.path}: two runs would share the folder {shared}: make the learning rates differ in "
                        "their first 6 significant digits")
    return runs


def _arg(value: Any) -> str:
    """A value as jsonargparse reads it on the command line: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def fit_command(spec: SweepSpec, run: Run, out: Path) -> list[str]:
    run_dir = out / run.key
    args = [sys.executable, "-m", "llmtrain.cli", "fit"]
    for base in spec.base:
        args += ["--config", str(base)]
    # One seed for init and data order: seed s of every variant sees the same batches from the same init.
    args += ["--seed_everything", str(run.seed), "--data.seed", str(run.seed),
             "--trainer.logger.init_args.save_dir", str(run_dir.parent),
             "--trainer.logger.init_args.name", run_dir.name, "--trainer.logger.init_args.version", "",
             "--trainer.enable_progress_bar", "false"]
    for key, value in run.overrides.items():
        args += [f"--{key}", _arg(value)]
    if run.lr is not None:
        args += ["--model.optim.lr", _arg(run.lr)]
    return args


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------- running one


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written to a temporary name and renamed: a reader (or a killed writer) never sees half a file. Strict JSON:
    a NaN in a run's summary (a metric not logged, a diverged loss) is written as null."""
    from llmtrain.report import strict_json

    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # array tasks share the folder
    tmp.write_text(strict_json(data))
    os.replace(tmp, path)


def read_result(run_dir: Path) -> Optional[dict[str, Any]]:
    path = run_dir / "result.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(result: Optional[dict[str, Any]]) -> bool:
    """Finished and diverged runs are results; failed (or never finished) runs are to be run again."""
    return result is not None and result.get("status") in ("finished", "diverged")


def _set_aside(run_dir: Path) -> None:
    """A failed attempt without a checkpoint cannot be resumed: keep its files beside the run, out of the way of
    the fresh attempt (whose events would otherwise be read together with the stale ones)."""
    n = 1
    while run_dir.with_name(f"{run_dir.name}.attempt{n}").exists():
        n += 1
    run_dir.rename(run_dir.with_name(f"{run_dir.name}.attempt{n}"))


def classify(exit_code: int, log_text: str, loss: dict[int, float]) -> tuple[str, Optional[int]]:
    """(status, diverged step): diverged when SpikeDetector stopped the run or the loss ends NaN/inf or far above
    its best (report.diverged_at); failed when the fit exited non-zero for any other reason."""
    from llmtrain.report import diverged_at

    step = diverged_at(loss) if loss else None
    if exit_code != 0 and TRAINING_DIVERGED in log_text:
        return "diverged", step if step is not None else (max(loss) if loss else None)
    if step is not None:
        return "diverged", step
    return ("finished" if exit_code == 0 else "failed"), None


def execute(spec: SweepSpec, run: Run, out: Path) -> tuple[dict[str, Any], bool]:
    """Runs one `llmtrain fit` unless its result is in already; returns (result, whether it ran now)."""
    from llmtrain.events import read_scalars
    from llmtrain.report import summarize_run

    run_dir = out / run.key
    result = read_result(run_dir)
    if is_done(result):
        if result.get("fingerprint") != run.fingerprint:
            raise SpecError(f"{run_dir} holds a {result['status']} run made with other settings (the spec or the "
                            "base config changed since); sweep into a new --out, or delete that folder to redo it")
        return result, False
    resume = has_checkpoint(run_dir)
    if run_dir.is_dir() and not resume and any(run_dir.rglob("events.out.tfevents.*")):
        _set_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # An interrupted or failed run continues from its checkpoint (a fresh fit into that folder is refused).
    command = fit_command(spec, run, out) + (["--ckpt_path", "last"] if resume else [])
    start = time.time()
    with open(run_dir / "fit.log", "a") as log:
        log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')}: {shlex.join(command)}\n")
        log.flush()
        exit_code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    wall_s = time.time() - start
    try:
        scalars = read_scalars(run_dir)
    except FileNotFoundError:
        scalars = {}
    status, step = classify(exit_code, (run_dir / "fit.log").read_text(errors="replace")[-20000:],
                            scalars.get("train/loss", {}))
    attempts = (result or {}).get("attempts", 0) + 1
    result = {
        "status": status, "diverged_step": step, "exit_code": exit_code, "attempts": attempts,
        "wall_s": wall_s + ((result or {}).get("wall_s", 0.0) if resume else 0.0),
        "index": run.index, "key": run.key, "variant": run.variant, "seed": run.seed, "lr": run.lr,
        "params": run.params, "params_total": run.params_total, "flops_per_token": run.flops_per_token,
        "tokens": run.tokens, "shape": run.shape, "overrides": run.overrides, "fingerprint": run.fingerprint,
        "command": shlex.join(command), "summary": summarize_run(scalars) if scalars else None,
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    write_json(run_dir / "result.json", result)
    return result, True


def write_manifest(spec: SweepSpec, runs: list[Run], out: Path) -> None:
    """sweep.json: the spec as resolved and every run, read by `llmtrain report SWEEP_DIR`."""
    vocab = ModelConfig(**_model_fields(spec.base_config)).vocab_size
    manifest = {
        "name": spec.name, "description": spec.description, "spec": str(spec.path.resolve()),
        "base": [str(b) for b in spec.base], "variants": list(spec.variants), "baseline": spec.baseline,
        "seeds": spec.seeds, "lrs": spec.lrs, "match": spec.match, "vocab_size": vocab, "curves": spec.curves,
        "runs": [{"index": r.index, "key": r.key, "variant": r.variant, "seed": r.seed, "lr": r.lr,
                  "params": r.params, "params_total": r.params_total, "flops_per_token": r.flops_per_token,
                  "tokens": r.tokens, "shape": r.shape, "overrides": r.overrides} for r in runs],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", manifest)
    if not (out / "spec.yaml").is_file() or (out / "spec.yaml").read_text() != spec.path.read_text():
        tmp = out / f".spec.yaml.{socket.gethostname()}.{os.getpid()}.tmp"
        tmp.write_text(spec.path.read_text())
        os.replace(tmp, out / "spec.yaml")


# ---------------------------------------------------------------------------------------------- SLURM arrays

ARRAY_TEMPLATE = """#!/bin/bash
# llmtrain sweep {name}: one run of {spec} per array task: {count} of its {total} runs (those not done yet).
# Rendered by `llmtrain sweep --slurm` ({rendered_at}).
#SBATCH --job-name=sweep-{name}
#SBATCH --array={array}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --chdir={workdir}
#SBATCH --output={out}/slurm/%A_%a.out
#SBATCH --open-mode=append
{directives}
set -euo pipefail
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}

# A requeued task runs the same index again: a finished run is skipped, an interrupted one resumes from its
# last checkpoint.
exec {python} -m llmtrain.cli sweep {spec} --out {out} --index "$SLURM_ARRAY_TASK_ID"
"""


def array_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (sbatch --array syntax)."""
    parts, start = [], None
    for i, index in enumerate(indices):
        start = index if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def render_array(spec: SweepSpec, runs: list[Run], out: Path, pending: list[int], args: argparse.Namespace) -> str:
    """The sbatch script of a job array over the `pending` run indices (one GPU, one task each)."""
    from llmtrain.launch import SubmitError, time_limit_seconds

    config = spec.base_config.get("trainer") or {}
    if config.get("devices", 1) not in (1, "1") or config.get("num_nodes", 1) != 1:
        raise SubmitError("the array runs each sweep run as one task on one GPU; this base config asks for "
                          f"trainer.devices={config.get('devices')!r}, num_nodes={config.get('num_nodes', 1)!r}: "
                          "submit such runs one by one with `llmtrain submit`")
    directives = [f"--gpus={args.gpus_per_run}"] if args.gpus_per_run else []
    if args.time:
        time_limit_seconds(args.time)  # refuses a malformed limit, naming SLURM's formats
        directives.append(f"--time={args.time}")
    for flag in ("partition", "account"):
        if getattr(args, flag):
            directives.append(f"--{flag}={getattr(args, flag)}")
    if args.cpus_per_task:
        directives.append(f"--cpus-per-task={args.cpus_per_task}")
    directives.append("--requeue")
    for option in args.sbatch_options:
        if not option.startswith("--"):
            raise SubmitError(f"--sbatch {option!r}: give a long sbatch option, e.g. --sbatch=--qos=high")
        directives.append(option)
    array = array_ranges(pending) + (f"%{args.max_parallel}" if args.max_parallel else "")
    return ARRAY_TEMPLATE.format(
        name=spec.name, spec=shlex.quote(str(spec.path.resolve())), count=len(pending), total=len(runs),
        rendered_at=datetime.datetime.now().isoformat(timespec="seconds"), array=array,
        workdir=shlex.quote(str(Path.cwd())), out=shlex.quote(str(out.resolve())), python=shlex.quote(args.python),
        directives="\n".join(f"#SBATCH {d}" for d in directives))


def check_fit_arguments(spec: SweepSpec, runs: list[Run], out: Path) -> None:
    """Parses each distinct variant x LR exactly as its runs will (`fit --print_config`), before submitting."""
    from llmtrain.launch import SubmitError

    seen = set()
    for run in runs:
        if (run.variant, run.lr) in seen:
            continue
        seen.add((run.variant, run.lr))
        command = fit_command(spec, run, out) + ["--print_config"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SubmitError(f"run {run.key}: the fit arguments do not parse:\n{result.stderr.strip()[-3000:]}")


def submit_array(spec: SweepSpec, runs: list[Run], out: Path, args: argparse.Namespace) -> int:
    from llmtrain.launch import SubmitError, check_with_slurm, find_sbatch

    pending = [r.index for r in runs if not is_done(read_result(out / r.key))]
    if not pending:
        print(f"all {len(runs)} runs of {spec.name} are done; nothing to submit")
        return 0
    try:
        script = render_array(spec, runs, out, pending, args)
        if args.dry_run:
            print(script, end="")
            return 0
        sbatch = find_sbatch()
        check_with_slurm(sbatch, script)
        check_fit_arguments(spec, runs, out)
        (out / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM does not create the folder of --output
        write_manifest(spec, runs, out)
        result = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True)
        if result.returncode != 0:
            raise SubmitError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    except SubmitError as error:
        print(f"llmtrain sweep: error: {error}", file=sys.stderr)
        return 2
    job_id = result.stdout.strip().split(";")[0]
    (out / "slurm" / f"sweep-{job_id}.sbatch").write_text(script)
    print(f"Submitted array job {job_id}: {len(pending)} runs of {spec.name}\n"
          f"  logs:   {out}/slurm/{job_id}_<index>.out\n  report: llmtrain report {out}")
    return 0


# ------------------------------------------------------------------------------------------------------ main


def sweep_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmtrain sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("spec", type=Path, help="the sweep spec YAML (configs/ablations/*.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="sweep folder (default runs/sweeps/<name>)")
    parser.add_argument("--index", type=int, default=None, help="run only run INDEX (what an array task does)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="list the runs and their commands (with --slurm: print the script); run nothing")
    slurm = parser.add_argument_group("SLURM job array (--slurm): one task per run not yet done")
    slurm.add_argument("--slurm", action="store_true", help="submit the runs as a job array instead of running them")
    slurm.add_argument("--time", help="time limit per run, e.g. 02:00:00 (default: the partition's)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--account", help="SLURM account")
    slurm.add_argument("--gpus_per_run", type=int, default=1, help="GPUs per task (default 1; 0: a CPU partition)")
    slurm.add_argument("--cpus_per_task", type=int, help="CPU cores per task")
    slurm.add_argument("--max_parallel", type=int, help="at most this many tasks at once (--array=...%%N)")
    slurm.add_argument("--sbatch", dest="sbatch_options", action="append", default=[], metavar="OPTION",
                       help="an extra sbatch option, repeatable: --sbatch=--qos=high")
    slurm.add_argument("--python", default=sys.executable, help="the Python on the nodes (default: this one)")
    args = parser.parse_args(argv)
    try:
        spec = SweepSpec.load(args.spec)
        runs = expand_runs(spec)
    except SpecError as error:
        print(f"llmtrain sweep: error: {error}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / "sweeps" / spec.name
    if args.slurm:
        return submit_array(spec, runs, out, args)
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            parser.error(f"--index {args.index} is out of range: this sweep has {len(runs)} runs (0..{len(runs) - 1})")
    if not args.dry_run:
        write_manifest(spec, runs, out)
    if args.index is not None:
        runs = [runs[args.index]]
    if args.dry_run:
        for run in runs:
            done = read_result(out / run.key)
            state = done["status"] if is_done(done) else "to run"
            print(f"[{run.index}] {run.key}  params {run.params:,} (total {run.params_total:,})  {state}\n"
                  f"    {shlex.join(fit_command(spec, run, out))}")
        return 0
    failed = 0
    for n, run in enumerate(runs, 1):
        try:
            result, ran = execute(spec, run, out)
        except SpecError as error:
            print(f"llmtrain sweep: error: {error}", file=sys.stderr)
            return 2
        state = result["status"]
        if result["status"] == "diverged":
            state += f" at step {result['diverged_step']}"
        state += "" if ran else " (done earlier, skipped)"
        print(f"[{n}/{len(runs)}] {run.key}: {state} ({result['wall_s'] / 60:.1f} min)", flush=True)
        failed += result["status"] == "failed"
    if failed:
        print(f"{failed} run(s) failed: see fit.log in their folders; a re-run retries them", file=sys.stderr)
    return 1 if failed else 0
