"""`llmtrain sweep` and the sweep report: grid expansion, parameter matching, spec errors, skip-on-rerun,
LR sensitivity on hand-made numbers, and a tiny real CPU sweep reported end to end."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from llmtrain.cli import main as llmtrain_main
from llmtrain.data.shards import unigram_entropy
from llmtrain.model.config import ModelConfig
from llmtrain.sweep import (SweepSpec, array_ranges, expand_grid, expand_runs, resolved_settings, sweep_main,
                            token_budget)
from llmtrain.sweep_report import lr_sensitivity

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = REPO / "configs" / "ablations"
SPECS = sorted(p for p in ABLATIONS.glob("*.yaml") if p.name != "base.yaml")


def write_spec(folder: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({"name": "t", "base": str(ABLATIONS / "base.yaml"), "seeds": [1], **spec},
                                   sort_keys=False))
    return path


def by_variant(runs) -> dict:
    return {r.variant: r for r in runs}


# ------------------------------------------------------------------------------------------ spec and matching


def test_grid_expands_to_every_combination_seed_major(tmp_path):
    assert list(expand_grid({"model.config.norm_position": ["pre", "post"], "model.optim.warmup_steps": [500, 0]})) \
        == ["norm_position=pre,warmup_steps=500", "norm_position=pre,warmup_steps=0",
            "norm_position=post,warmup_steps=500", "norm_position=post,warmup_steps=0"]
    spec = SweepSpec.load(write_spec(tmp_path, {"seeds": [1, 2], "lrs": ["1e-3", 3.0e-3],  # `1e-3` is a YAML string
                                                "grid": {"model.config.bias": [False, True]}}))
    runs = expand_runs(spec)
    assert len(runs) == 2 * 2 * 2 and [r.index for r in runs] == list(range(8))
    assert [r.key for r in runs[:4]] == ["bias=False/lr0.001/seed1", "bias=False/lr0.003/seed1",
                                         "bias=True/lr0.001/seed1", "bias=True/lr0.003/seed1"]
    assert {r.seed for r in runs[4:]} == {2}  # every variant at seed 1 before any at seed 2
    assert len({r.tokens for r in runs}) == 1 and runs[0].tokens == 1500 * 64 * 512


def test_swiglu_and_gelu_are_matched_within_one_percent():
    runs = by_variant(expand_runs(SweepSpec.load(ABLATIONS / "ffn_activation.yaml")))
    gelu, swiglu = runs["gelu"], runs["swiglu"]
    assert gelu.shape["d_ff"] == 4 * 256  # the reference itself
    assert abs(swiglu.shape["d_ff"] - 8 / 3 * 256) <= 8  # Shazeer 2020: 8/3·d for equal parameters
    for run in runs.values():
        assert abs(run.params / gelu.params - 1) < 0.01, run.variant
    # The fit command carries the sized width.
    assert swiglu.overrides["model.config.d_ff"] == swiglu.shape["d_ff"]


@pytest.mark.parametrize("spec, by", [("aspect_ratio.yaml", "n_layer"), ("ffn_ratio.yaml", "d_ff")])
def test_shape_sweeps_hold_parameters_within_two_percent(spec, by):
    runs = by_variant(expand_runs(SweepSpec.load(ABLATIONS / spec)))
    baseline = runs[SweepSpec.load(ABLATIONS / spec).baseline]
    assert len({r.shape[by] for r in runs.values()}) == len(runs)  # the swept field really varies
    assert len({r.shape["d_model"] for r in runs.values()}) == len(runs)  # d_model was sized for each
    for run in runs.values():
        assert abs(run.params / baseline.params - 1) < 0.02, (run.variant, run.params, baseline.params)


def test_token_budget_reads_the_global_batch_where_it_is_set():
    config = {"trainer": {"max_steps": 10, "devices": 4, "accumulate_grad_batches": 2},
              "data": {"seq_len": 128, "micro_batch_size": 8}}
    assert token_budget(config) == 10 * 128 * 8 * 2 * 4
    config["data"]["global_batch_size"] = 96  # the trainer's accumulation then follows from it
    assert token_budget(config) == 10 * 128 * 96
    config["trainer"]["devices"] = "auto"
    assert token_budget(config) == 10 * 128 * 96


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_shipped_specs_load_with_three_seeds_and_one_token_budget(spec_path):
    spec = SweepSpec.load(spec_path)
    runs = expand_runs(spec)
    assert len(spec.seeds) >= 3 and len({r.tokens for r in runs}) == 1 and runs[0].tokens


@pytest.mark.parametrize("spec, words", [
    ({"variants": {"a": {}}, "sedes": [1]}, ["`sedes`", "unknown key"]),
    ({"variants": {"a": {"model.config.ffn_type": "gelu"}}}, ["variants.a.model.config.ffn_type", "ffn"]),
    ({"variants": {"a": {"model.config.ffn": "swish"}}}, ["variant 'a'", "ffn='swish'"]),
    ({"variants": {"a": {}}, "lrs": [1.0e-3], "overrides": {"model.optim.lr": 0.01}}, ["model.optim.lr", "lrs"]),
    ({"variants": {"a": {}}, "match": {"by": "model.config.n_head"}}, ["match.by", "model.config.d_ff"]),
    ({"variants": {"a": {"model.config.d_ff": 64}}, "match": {"by": "model.config.d_ff"}},
     ["variants.a.model.config.d_ff", "match.by"]),
    ({"variants": {"a": {}, "b": {"trainer.max_steps": 5}}}, ["token budgets", "a: 49152000"]),
    ({"variants": {"a": {"seed_everything": 3}}}, ["variants.a.seed_everything"]),
    ({"variants": {"a": {}}, "seeds": [1, 1]}, ["`seeds`"]),
    ({"variants": {"a": {}}, "base": "configs/nope.yaml"}, ["`base`", "configs/nope.yaml"]),
    ({"grid": {"model.config.bias": [True]}, "variants": {"a": {}}}, ["`grid`", "not both"]),
    ({"variants": {"a": {}}, "baseline": "b"}, ["`baseline`", "'b'"]),
    ({"variants": {"a": {}}, "curves": "val/loss"}, ["`curves`", "list of TensorBoard tags"]),
])
def test_spec_errors_name_the_key(tmp_path, capsys, spec, words):
    assert sweep_main([str(write_spec(tmp_path, spec)), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------- skip on re-run


def test_finished_and_diverged_runs_are_skipped_failed_ones_run_again(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, {"variants": {"a": {}, "b": {}, "c": {}}})
    out = tmp_path / "out"
    calls = []

    def fake_fit(command, **kwargs):
        calls.append(command)
        variant = Path(command[command.index("--trainer.logger.init_args.save_dir") + 1]).name
        return subprocess.CompletedProcess(command, 1 if variant == "c" else 0)

    monkeypatch.setattr("llmtrain.sweep.subprocess.run", fake_fit)
    assert sweep_main([str(spec), "--out", str(out)]) == 1  # c failed: the sweep says so, after running all
    assert len(calls) == 3
    status = {v: json.loads((out / v / "seed1" / "result.json").read_text())["status"] for v in "abc"}
    assert status == {"a": "finished", "b": "finished", "c": "failed"}
    result_b = json.loads((out / "b" / "seed1" / "result.json").read_text())
    result_b.update(status="diverged", diverged_step=7)  # a diverged run is a result too
    (out / "b" / "seed1" / "result.json").write_text(json.dumps(result_b))

    calls.clear()
    capsys.readouterr()
    assert sweep_main([str(spec), "--out", str(out)]) == 1
    assert [Path(c[c.index("--trainer.logger.init_args.save_dir") + 1]).name for c in calls] == ["c"]
    printed = capsys.readouterr().out
    assert "a/seed1: finished (done earlier, skipped)" in printed
    assert "b/seed1: diverged at step 7 (done earlier, skipped)" in printed
    assert json.loads((out / "c" / "seed1" / "result.json").read_text())["attempts"] == 2

    # A finished run made with other settings is not silently reused.
    spec.write_text(spec.read_text().replace("seeds:\n- 1", "seeds:\n- 1\noverrides:\n  model.optim.weight_decay: 0.0"))
    assert sweep_main([str(spec), "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_slurm_dry_run_renders_an_array_of_the_runs_not_done(tmp_path, capsys):
    spec = write_spec(tmp_path, {"seeds": [1, 2], "variants": {"a": {}, "b": {}}})
    out = tmp_path / "out"
    (out / "a" / "seed1").mkdir(parents=True)
    (out / "a" / "seed1" / "result.json").write_text(json.dumps({"status": "finished"}))
    assert sweep_main([str(spec), "--out", str(out), "--slurm", "--dry-run", "--time", "02:00:00",
                       "--max_parallel", "2", "--sbatch=--qos=high"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=1-3%2" in script and "#SBATCH --gpus=1" in script and "#SBATCH --qos=high" in script
    assert '--index "$SLURM_ARRAY_TASK_ID"' in script and f"--out {out.resolve()}" in script
    assert array_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert sweep_main([str(spec), "--out", str(out), "--slurm", "--dry-run", "--time", "2 hours"]) == 2
    assert "--time '2 hours'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the report


def test_lr_sensitivity_on_hand_made_numbers():
    cap = 5.0
    # loss(lr) per LR: 3.0, mean(3.4, 3.6) = 3.5, and a diverged run (NaN) and one above the cap: both count as 5.
    losses = {1e-3: [3.0], 1e-2: [3.4, 3.6], 1e-1: [math.nan, 7.0]}
    assert lr_sensitivity(losses, cap) == pytest.approx((0.0 + 0.5 + 2.0) / 3)
    assert lr_sensitivity({1e-3: [3.0], 1e-2: [3.0]}, cap) == 0.0  # flat: insensitive
    assert lr_sensitivity({1e-3: [3.0], 1e-2: []}, cap) == 0.0  # an LR without results is left out


def fake_run(folder: Path, variant: str, lr: float, seed: int, val: list[float], status: str = "finished",
             diverged_step=None) -> dict:
    writer = SummaryWriter(str(folder))
    for step, value in enumerate(val):
        writer.add_scalar("train/loss", value, step * 10)
        writer.add_scalar("train/tokens", 1000.0 * (step * 10 + 1), step * 10)
        writer.add_scalar("val/loss", value, step * 10)
    writer.close()
    key = folder.relative_to(folder.parents[2]).as_posix()
    (folder / "result.json").write_text(json.dumps({"status": status, "diverged_step": diverged_step, "wall_s": 60.0,
                                                    "key": key}))
    return {"key": key, "variant": variant, "lr": lr, "seed": seed, "params": 1000,
            "shape": {"d_model": 32, "n_layer": 2, "d_ff": 96}, "tokens": 41000}


def table_rows(text: str, header: str = "| variant | LR | runs ok |") -> dict[tuple[str, str], dict[str, str]]:
    """The rows of the markdown table whose header starts with `header`: (first cell, second cell) -> column -> cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    columns = [c.strip() for c in lines[start].strip("|").split(" | ")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[(cells[0], cells[1])] = dict(zip(columns, cells))
    return rows


def test_sweep_report_verdicts_divergence_and_lr_sensitivity(tmp_path):
    sweep = tmp_path / "sweep"
    losses = {("base", 1e-3): [[5.0, 4.0, 3.50], [5.0, 4.0, 3.52]], ("qk", 1e-3): [[5.0, 4.0, 3.51], [5.0, 4.0, 3.51]],
              ("base", 1e-2): [[5.0, 3.6, 3.40], [5.0, 3.6, 3.42]], ("qk", 1e-2): [[5.0, 3.5, 3.20], [5.0, 3.5, 3.22]]}
    runs = []
    for (variant, lr), seeds in losses.items():
        for seed, val in enumerate(seeds, 1):
            runs.append(fake_run(sweep / variant / f"lr{lr:g}" / f"seed{seed}", variant, lr, seed, val))
    runs.append(fake_run(sweep / "base" / "lr0.1" / "seed1", "base", 0.1, 1, [5.0, 9.0, math.nan], "diverged", 10))
    runs.append(fake_run(sweep / "qk" / "lr0.1" / "seed1", "qk", 0.1, 1, [5.0, 3.9, 3.8]))
    (sweep / "sweep.json").write_text(json.dumps({
        "name": "qk_norm", "variants": ["base", "qk"], "baseline": "base", "seeds": [1, 2],
        "lrs": [1e-3, 1e-2, 0.1], "vocab_size": 320, "runs": runs}))

    assert llmtrain_main(["report", str(sweep)]) == 0
    text = (sweep / "report" / "summary.md").read_text()
    rows = table_rows(text)
    assert rows[("qk", "0.001")]["verdict"] == "no difference"  # +0.01 and -0.01 in the two seeds
    assert rows[("qk", "0.001")]["Δ vs baseline (paired)"].startswith("+0.000 ± 0.010 (2 seeds)")
    assert rows[("qk", "0.01")]["verdict"] == "lower"  # -0.20 in both seeds
    assert rows[("qk", "0.01")]["Δ vs baseline (paired)"].startswith("-0.200")
    assert rows[("base", "0.1")]["diverged (steps)"] == "1 (10)" and rows[("base", "0.1")]["runs ok"] == "0/1"
    assert rows[("qk", "0.1")]["verdict"] == "no paired loss: diverged 0/1 seeds, baseline 1/1"
    cap = math.log(320)
    base_sens = ((3.51 - 3.41) + 0 + (cap - 3.41)) / 3
    qk_sens = ((3.51 - 3.21) + 0 + (3.8 - 3.21)) / 3
    per_variant = table_rows(text, "| variant | LR sensitivity")
    assert per_variant[("base", f"{base_sens:.4f}")]["best LR"] == "0.01"
    assert per_variant[("qk", f"{qk_sens:.4f}")]["diverged runs"] == "0/5"
    assert per_variant[("base", f"{base_sens:.4f}")]["diverged runs"] == "1/5 (lr 0.1 seed 1 at 10)"
    for png in ("val_loss_vs_tokens", "val_loss_diff_vs_tokens", "val_loss_vs_time", "lr_sensitivity"):
        assert (sweep / "report" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"({png}.png)" in text
    # The raw curves and the differences sit side by side on one line.
    assert "![val_loss_vs_tokens](val_loss_vs_tokens.png) ![val_loss_diff_vs_tokens](val_loss_diff_vs_tokens.png)" \
        in text


def test_single_seed_verdicts_are_read_against_a_seed_noise_sweep(tmp_path):
    noise, sweep = tmp_path / "noise", tmp_path / "sweep"
    noise_runs = [fake_run(noise / "base" / "lr0.001" / f"seed{s}", "base", 1e-3, s, [5.0, v])
                  for s, v in ((1, 3.50), (2, 3.55), (3, 3.60))]  # std 0.05
    (noise / "sweep.json").write_text(json.dumps({"name": "seed_noise", "variants": ["base"], "baseline": "base",
                                                  "seeds": [1, 2, 3], "lrs": [1e-3], "runs": noise_runs}))
    runs = [fake_run(sweep / v / "lr0.001" / "seed1", v, 1e-3, 1, [5.0, val])
            for v, val in (("base", 3.50), ("close", 3.45), ("far", 3.10))]
    (sweep / "sweep.json").write_text(json.dumps({"name": "one_seed", "variants": ["base", "close", "far"],
                                                  "baseline": "base", "seeds": [1], "lrs": [1e-3], "runs": runs}))

    assert llmtrain_main(["report", str(sweep)]) == 0
    rows = table_rows((sweep / "report" / "summary.md").read_text())
    assert rows[("far", "0.001")]["Δ vs baseline (paired)"] == "-0.400 (1 seed)"
    assert rows[("far", "0.001")]["verdict"] == "n/a (1 paired seed: needs ≥ 2, or a seed-noise sweep: --noise)"
    assert llmtrain_main(["report", str(sweep), "--noise", str(noise)]) == 0
    text = (sweep / "report" / "summary.md").read_text()
    assert "- Seed noise: final val loss 3.550 ± 0.050 over 3 seeds" in text
    # One pair against the noise: se = 0.05·√2 = 0.0707, half-width t(0.975, 2 df) · se = 4.303 · 0.0707 = 0.304.
    rows = table_rows(text)
    assert rows[("close", "0.001")]["verdict"].startswith("no difference (1 seed, read against the seed noise")
    assert rows[("far", "0.001")]["verdict"] == "lower (1 seed, read against the seed noise: weaker evidence)"
    assert rows[("far", "0.001")]["95% CI of Δ"] == "[-0.704, -0.096]"
    with pytest.raises(SystemExit):
        llmtrain_main(["report", str(sweep), "--noise", str(tmp_path / "nowhere")])


def tiny_base(corpus: dict[str, Path], path: Path) -> Path:
    """A few-step CPU config with throughput and logit monitors every 2 steps and no checkpoints (jsonargparse
    cannot override one entry of the callback list, so the list is written here)."""
    callbacks = [{"class_path": "llmtrain.callbacks.Throughput", "init_args": {"window": 1, "warmup_steps": 0}}]
    callbacks += [{"class_path": f"llmtrain.callbacks.{name}", "init_args": {"every_n_steps": 2}}
                  for name in ("LogitMonitor", "AttentionMonitor")]
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 4,
                    "val_check_interval": 2, "check_val_every_n_epoch": None, "limit_val_batches": 1,
                    "log_every_n_steps": 1, "enable_checkpointing": False, "callbacks": callbacks,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "runs", "name": "x", "version": "",
                                             "default_hp_metric": False}}},
        "model": {"config": {"vocab_size": 320, "max_seq_len": 32, "d_model": 32, "n_layer": 2, "n_head": 2,
                             "ffn": "gelu", "d_ff": 128},
                  "optim": {"lr": 3.0e-3, "warmup_steps": 1, "total_steps": 4}},
        "data": {"data_dir": str(corpus["shards"]), "seq_len": 32, "micro_batch_size": 4, "num_workers": 0},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
def test_tiny_cpu_sweep_end_to_end(prepared_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    base = tiny_base(prepared_corpus, tmp_path / "base.yaml")
    spec = tmp_path / "ffn.yaml"
    spec.write_text(yaml.safe_dump({"name": "tiny_ffn", "base": str(base), "seeds": [1],
                                    "match": {"quantity": "params", "by": "model.config.d_ff"},
                                    "variants": {"gelu": {"model.config.ffn": "gelu"},
                                                 "swiglu": {"model.config.ffn": "swiglu"}}}))
    out = tmp_path / "sweep"
    assert llmtrain_main(["sweep", str(spec), "--out", str(out)]) == 0, \
        "\n".join((out / v / "seed1" / "fit.log").read_text()[-3000:] for v in ("gelu", "swiglu"))
    for variant in ("gelu", "swiglu"):
        result = json.loads((out / variant / "seed1" / "result.json").read_text())
        assert result["status"] == "finished" and result["summary"]["steps"] == 4
        assert math.isfinite(result["summary"]["final_val_loss"])
    assert json.loads((out / "swiglu" / "seed1" / "result.json").read_text())["shape"]["d_ff"] == 88  # 8/3 · 32 ≈ 85

    capsys.readouterr()
    assert llmtrain_main(["sweep", str(spec), "--out", str(out)]) == 0  # nothing to do the second time
    assert capsys.readouterr().out.count("finished (done earlier, skipped)") == 2

    assert llmtrain_main(["report", str(out)]) == 0
    text = (out / "report" / "summary.md").read_text()
    assert "| variant | LR | runs ok |" in text
    assert "Fewer than 3 seeds" in text
    # Four steps learn nothing of the context: both runs end above the unigram entropy of the val split they name.
    level = unigram_entropy(prepared_corpus["shards"])
    assert f"- Unigram level (stalled at or above it): {level:.3f} nats, the val split of " in text
    assert "| gelu | base | 0/1 |" in text and "| `swiglu/seed1` | stalled |" in text
    assert table_rows(text)[("swiglu", "base")]["verdict"] == \
        "no paired loss: variant diverged 0/1, stalled 1/1 seeds; baseline diverged 0/1, stalled 1/1"
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert [c["variant"] for c in summary["cells"]] == ["gelu", "swiglu"]
    assert all(run["status"] == "stalled" and run["summary"]["final_val_loss"] >= level for run in summary["runs"])
    for png in ("val_loss_vs_tokens", "val_loss_vs_time"):  # stalled runs are drawn; no pair: no difference plot
        assert (out / "report" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_fingerprints_ignore_spelling_and_fields_left_at_their_defaults(tmp_path):
    # `qk_norm: false` given equals it left out; the resolved d_ff stays in (it is what the run trains); a field at
    # its default is left out, so a field added to ModelConfig later does not orphan finished runs.
    spec = SweepSpec.load(write_spec(tmp_path, {"seeds": [1], "variants": {
        "implicit": {}, "explicit": {"model.config.qk_norm": False, "model.config.d_ff": 680},
        "qk": {"model.config.qk_norm": True}}}))
    runs = by_variant(expand_runs(spec))
    assert runs["implicit"].fingerprint == runs["explicit"].fingerprint != runs["qk"].fingerprint
    model = ModelConfig(**spec.base_config["model"]["config"])
    fields = resolved_settings(spec.base_config, model)["model"]["config"]
    assert fields["d_ff"] == 680 and fields["head_dim"] == 64 and "qk_norm" not in fields and "bias" not in fields
