"""Ablation sweeps: a base config × variants (× learning rates) × seeds -> one `llmtrain fit` run each.

A spec (YAML, see configs/ablations/):

    name: ffn
    base: configs/ablations/base.yaml      # a fit config: model, data, token budget
    overrides: {trainer.max_steps: 2000}   # dotted keys applied to every run
    seeds: [1, 2, 3]                       # same seeds for every variant (paired comparison)
    lrs: [1.0e-3, 3.0e-3]                  # optional: a learning-rate sweep per variant
    match: {params: true, by: model.config.d_ff}   # optional: size `by` so every variant has the base's params
    variants:                              # named variants, or `grid:` {key: [values]} for a cartesian product
      swiglu: {model.config.ffn: swiglu}
      gelu: {model.config.ffn: gelu}

Every run writes SWEEP_DIR/<variant>/lr<lr>/seed<seed>/ (TensorBoard logs, checkpoints) and a result.json;
a run whose result.json says "finished" is skipped on re-run; a failed or diverged run is recorded as such.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from llmtrain.model.config import ModelConfig

MATCHABLE = ("model.config.d_ff", "model.config.n_layer", "model.config.d_model")


@dataclass
class Run:
    variant: str
    seed: int
    lr: Optional[float]
    overrides: dict[str, Any]
    params: int = 0

    @property
    def key(self) -> str:
        lr = f"lr{self.lr:g}" if self.lr is not None else "lr-base"
        return f"{self.variant}/{lr}/seed{self.seed}"


@dataclass
class SweepSpec:
    name: str
    base: str
    variants: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [1])
    lrs: list[float] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    match: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> "SweepSpec":
        spec_path = Path(path)
        if not spec_path.is_file():
            raise SystemExit(f"error: sweep spec {path} does not exist")
        raw = yaml.safe_load(spec_path.read_text()) or {}
        known = {f.name for f in fields(cls)} | {"grid"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SystemExit(f"error: {path}: unknown keys {unknown}; valid: {sorted(known)}")
        if "grid" in raw:
            if "variants" in raw:
                raise SystemExit(f"error: {path}: give either `variants` or `grid`, not both")
            raw["variants"] = expand_grid(raw.pop("grid"))
        for key in ("name", "base", "variants"):
            if not raw.get(key):
                raise SystemExit(f"error: {path}: `{key}` is required")
        if not Path(raw["base"]).is_file():
            raise SystemExit(f"error: {path}: base config {raw['base']} does not exist")
        spec = cls(**raw)
        if spec.match:
            by = spec.match.get("by")
            if by not in MATCHABLE:
                raise SystemExit(f"error: {path}: match.by={by!r}; choose one of {', '.join(MATCHABLE)}")
        return spec


def expand_grid(grid: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """{key: [values]} -> named variants, one per combination, named `leaf=value,...`."""
    keys = list(grid)
    variants = {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, combo))
        variants[name] = dict(zip(keys, combo))
    return variants


def base_model_config(spec: SweepSpec) -> dict[str, Any]:
    config = yaml.safe_load(Path(spec.base).read_text())
    model = dict(config.get("model", {}).get("config", {}))
    for key, value in spec.overrides.items():
        if key.startswith("model.config."):
            model[key.removeprefix("model.config.")] = value
    return model


def _model_fields(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("model.config."): v for k, v in overrides.items() if k.startswith("model.config.")}


def match_params(base: dict[str, Any], variant: dict[str, Any], by: str) -> tuple[dict[str, Any], int]:
    """Sizes the field `by` so the variant's non-embedding parameter count is closest to the base's."""
    target = ModelConfig(**base).num_params(include_embedding=False)
    field_name = by.removeprefix("model.config.")
    merged = {**base, **variant}
    if field_name == "d_ff":
        merged.pop("d_ff", None)
        probe = ModelConfig(**merged)
        candidates = range(8, 16 * probe.d_model + 1, 8)  # multiples of 8 keep matmuls tensor-core friendly
    elif field_name == "n_layer":
        candidates = range(1, 257)
    else:  # d_model, in steps of the head count so heads divide it
        step = merged.get("n_head", 12) * 2
        candidates = range(step, 16385, step)

    def count(value: int) -> int:
        return ModelConfig(**{**merged, field_name: value}).num_params(include_embedding=False)

    best = min(candidates, key=lambda v: abs(count(v) - target))
    return {by: best}, count(best)


def expand_runs(spec: SweepSpec) -> list[Run]:
    base = base_model_config(spec)
    runs = []
    for name, overrides in spec.variants.items():
        overrides = dict(overrides)
        if spec.match.get("params"):
            sized, params = match_params(base, _model_fields(overrides), spec.match["by"])
            overrides.update(sized)
        else:
            params = ModelConfig(**{**base, **_model_fields(overrides)}).num_params(include_embedding=False)
        for lr in spec.lrs or [None]:
            for seed in spec.seeds:
                runs.append(Run(name, seed, lr, overrides, params))
    return runs


def fit_command(spec: SweepSpec, run: Run, out: Path) -> list[str]:
    run_dir = out / run.key
    args = [sys.executable, "-m", "llmtrain.cli", "fit", "--config", spec.base, "--seed_everything", str(run.seed),
            "--trainer.logger.init_args.save_dir", str(run_dir.parent),
            "--trainer.logger.init_args.name", run_dir.name, "--trainer.logger.init_args.version", "",
            "--trainer.enable_progress_bar", "false"]
    if run.lr is not None:
        args += ["--model.optim.lr", str(run.lr)]
    for key, value in {**spec.overrides, **run.overrides}.items():
        args += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")]
    if (run_dir / "checkpoints").is_dir():
        args += ["--ckpt_path", "last"]  # an interrupted run continues instead of being refused
    return args


def diverged_at(run_dir: Path, threshold: float) -> Optional[int]:
    from llmtrain.events import read_scalars

    try:
        loss = read_scalars(run_dir).get("train/loss", {})
    except FileNotFoundError:
        return None
    for step in sorted(loss):
        if not math.isfinite(loss[step]) or loss[step] > threshold:
            return step
    return None


def execute(spec: SweepSpec, run: Run, out: Path) -> dict[str, Any]:
    run_dir = out / run.key
    result_path = run_dir / "result.json"
    if result_path.is_file() and json.loads(result_path.read_text()).get("status") == "finished":
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run_dir / "fit.log", "a") as log:
        code = subprocess.run(fit_command(spec, run, out), stdout=log, stderr=subprocess.STDOUT).returncode
    vocab = base_model_config(spec).get("vocab_size", 32000)
    step = diverged_at(run_dir, threshold=2 * math.log(vocab))  # twice the loss of a uniform guess
    status = "diverged" if step is not None else ("finished" if code == 0 else "failed")
    result = {"status": status, "exit_code": code, "diverged_step": step, "wall_s": time.time() - start,
              "variant": run.variant, "seed": run.seed, "lr": run.lr, "params": run.params,
              "overrides": run.overrides}
    result_path.write_text(json.dumps(result, indent=2))
    return result


def sweep_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmtrain sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="the sweep spec YAML")
    parser.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<name>)")
    parser.add_argument("--index", type=int, default=None, help="run only run number INDEX (a SLURM array task)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")
    args = parser.parse_args(argv)
    spec = SweepSpec.load(args.spec)
    out = Path(args.out or f"runs/sweeps/{spec.name}")
    runs = expand_runs(spec)
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            parser.error(f"--index {args.index} is out of range: this sweep has {len(runs)} runs (0..{len(runs) - 1})")
        runs = [runs[args.index]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(Path(args.spec).read_text())
    for i, run in enumerate(runs):
        if args.dry_run:
            print(f"[{i}] {run.key} params={run.params:,}\n    {' '.join(fit_command(spec, run, out))}")
            continue
        result = execute(spec, run, out)
        print(f"[{i + 1}/{len(runs)}] {run.key}: {result['status']}", flush=True)
    return 0
