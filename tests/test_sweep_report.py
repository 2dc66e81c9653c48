"""The sweep report's statistics on planted runs (real TensorBoard event files in the layout `llmtrain sweep`
writes): Student's t quantiles against published values and closed forms, a paired offset far smaller than the
seed spread detected, identical variants not, diverged runs named, stability per variant, strictly valid JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pytest
from torch.utils.tensorboard import SummaryWriter

from llmtrain.data.shards import unigram_entropy
from llmtrain.report import strict_json
from llmtrain.stats import Difference, plus_minus, t_cdf, t_quantile
from llmtrain.sweep_report import difference_curve, load_sweep, write_sweep_report
from tests.test_sweep import table_rows

# Two-sided 95% (p = 0.975) and 99% (p = 0.995) critical values of Student's t, as printed in standard tables.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 8: 2.306, 10: 2.228, 15: 2.131, 20: 2.086,
         30: 2.042, 60: 2.000, 120: 1.980, math.inf: 1.960}
T_995 = {1: 63.657, 2: 9.925, 5: 4.032, 10: 3.169, 30: 2.750, math.inf: 2.576}


def test_t_quantiles_match_published_tables_and_closed_forms():
    for table, p in ((T_975, 0.975), (T_995, 0.995)):
        for df, value in table.items():
            assert t_quantile(p, df) == pytest.approx(value, abs=6e-4), (p, df)
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        assert t_quantile(1 - p, 7) == -t_quantile(p, 7)
        assert t_cdf(t_quantile(p, 3.5), 3.5) == pytest.approx(p, abs=1e-12)  # fractional df too
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError, match="df > 0"):
        t_quantile(0.975, 0)


def test_paired_differences_intervals_and_formatting():
    # Lower in both paired seeds: the interval of 2 seeds, -0.0075 ± 12.706 · 0.0005, excludes 0.
    two = Difference.paired([-0.008, -0.007])
    assert two.se == pytest.approx(0.0005) and two.df == 1
    assert two.interval == pytest.approx((-0.0075 - 12.7062 * 0.0005, -0.0075 + 12.7062 * 0.0005), abs=1e-6)
    assert two.verdict == "lower"
    assert Difference.paired([0.0, 0.0, 0.0]).verdict == "no difference"  # identical runs
    assert Difference.paired([0.01, -0.01]).verdict == "no difference"
    assert Difference.paired([0.02]).verdict == "-"  # one pair, no noise: no interval
    noise = Difference.against_noise(-0.3, 0.05, 4)  # se 0.05·√2, t with 3 df
    assert noise.interval[1] == pytest.approx(-0.3 + 3.182 * 0.05 * math.sqrt(2), abs=1e-3)
    assert noise.verdict == "lower" and noise.basis == "seed noise"
    assert plus_minus(4.07234, 0.01123) == "4.072 ± 0.011"
    assert plus_minus(-0.0075, 0.0005) == "-0.00750 ± 0.00050"  # the error keeps 2 significant digits
    assert plus_minus(3.2, math.nan) == "3.200" and plus_minus(math.nan, 0.1) == "-"


def plant_run(sweep: Path, variant: str, seed: int, val: list[float], lr: Optional[float] = None,
              status: str = "finished", attn: float = 5.0, spikes: tuple[int, ...] = (),
              data_dir: Optional[Path] = None) -> dict:
    """One run as `llmtrain sweep` leaves it: events (train and val loss, tokens, an attention and output logit,
    spike events) in SWEEP/<variant>[/lr<lr>]/seed<s>/ and its result.json, with `data_dir` a config.yaml naming
    those shards; returns its sweep.json entry."""
    key = f"{variant}{f'/lr{lr:g}' if lr is not None else ''}/seed{seed}"
    folder = sweep / key
    writer = SummaryWriter(str(folder))
    for i, value in enumerate(val):
        step = 10 * i
        writer.add_scalar("train/loss", value + 0.1, step)
        writer.add_scalar("train/tokens", 2048.0 * (step + 1), step)
        writer.add_scalar("val/loss", value, step)
        writer.add_scalar("stability/attn_logit_max/layer_00", attn * (i + 1) / len(val), step)
        writer.add_scalar("stability/logits/max_abs", 12.0, step)
    for step in spikes:
        writer.add_scalar("stability/spike/events", 1.0, step)
    writer.close()
    if data_dir is not None:
        (folder / "config.yaml").write_text(f"data:\n  data_dir: {data_dir}\n")
    (folder / "result.json").write_text(json.dumps({
        "status": status, "diverged_step": 20 if status == "diverged" else None, "wall_s": 30.0, "key": key}))
    return {"key": key, "variant": variant, "lr": lr, "seed": seed, "params": 5000,
            "shape": {"d_model": 32, "n_layer": 2, "d_ff": 96}, "tokens": 2048 * 31}


def write_manifest(sweep: Path, runs: list[dict], variants: list[str], seeds: list[int],
                   lrs: Optional[list[float]] = None) -> None:
    (sweep / "sweep.json").write_text(json.dumps({"name": "planted", "variants": variants, "baseline": variants[0],
                                                  "seeds": seeds, "lrs": lrs or [], "vocab_size": 320,
                                                  "runs": runs}))


# Seed effects of ±0.06 nats: the spread between seeds is ~7x the effect planted below.
SEED_EFFECT = {1: 0.0, 2: 0.06, 3: -0.05}


def test_a_small_paired_offset_is_detected_and_identical_variants_are_not(tmp_path):
    sweep = tmp_path / "sweep"
    runs = []
    for seed, effect in SEED_EFFECT.items():
        base = [5.0 + effect, 4.4 + effect, 4.1 + effect, 4.0 + effect]
        jitter = {1: 0.0, 2: 0.001, 3: -0.001}[seed]
        runs += [plant_run(sweep, "base", seed, base),
                 plant_run(sweep, "same", seed, base),  # the same losses: an identical variant
                 plant_run(sweep, "qk_norm", seed, [v - 0.008 * i / 3 + jitter * (i == 3) for i, v in enumerate(base)])]
    write_manifest(sweep, runs, ["base", "same", "qk_norm"], [1, 2, 3])

    text = write_sweep_report(sweep, tmp_path / "report").read_text()
    rows = table_rows(text)
    qk = rows[("qk_norm", "base")]
    # mean ± std per variant, ± 0.055 each: the two intervals overlap, which the old rule read as no difference.
    assert qk["final val loss"] == "3.995 ± 0.056" and rows[("base", "base")]["final val loss"] == "4.003 ± 0.055"
    # Paired: differences -0.008, -0.007, -0.009 -> -0.0080 ± 0.00058, 95% CI -0.008 ± 4.303 · 0.00058.
    assert qk["Δ vs baseline (paired)"] == "-0.00800 ± 0.00058 (3 seeds)"
    assert qk["95% CI of Δ"] == "[-0.01048, -0.00552]"
    assert qk["verdict"] == "lower"
    assert rows[("same", "base")]["verdict"] == "no difference"
    assert rows[("same", "base")]["Δ vs baseline (paired)"] == "+0.000 ± 0.000 (3 seeds)"

    # Over training: the planted offset grows from 0 to -0.008, the band is the 95% t interval of 3 pairs.
    _, records = load_sweep(sweep)
    xs, diffs, n = difference_curve([r for r in records if r.variant == "qk_norm"],
                                    [r for r in records if r.variant == "base"])
    assert n == 3 and xs == [2048.0 * (10 * i + 1) for i in range(4)]
    assert [d.mean for d in diffs] == pytest.approx([0.0, -0.008 / 3, -0.016 / 3, -0.008], abs=2e-6)
    assert diffs[-1].interval[1] < 0 < diffs[0].interval[1] + 1e-6
    assert (tmp_path / "report" / "val_loss_diff_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


def test_another_baseline_compares_every_variant_with_it_and_an_unknown_one_names_the_variants(tmp_path):
    sweep = tmp_path / "sweep"
    runs = []
    for seed, effect in SEED_EFFECT.items():
        base = [5.0 + effect, 4.0 + effect]
        runs += [plant_run(sweep, "base", seed, base),
                 plant_run(sweep, "wide", seed, [v - 0.01 for v in base]),
                 plant_run(sweep, "deep", seed, [v - 0.03 for v in base])]
    write_manifest(sweep, runs, ["base", "wide", "deep"], [1, 2, 3])

    rows = table_rows(write_sweep_report(sweep, tmp_path / "report", baseline="wide").read_text())
    assert rows[("wide", "base")]["verdict"] == "baseline"
    assert rows[("base", "base")]["Δ vs baseline (paired)"].startswith("+0.01") and \
        rows[("base", "base")]["verdict"] == "higher"
    assert rows[("deep", "base")]["Δ vs baseline (paired)"].startswith("-0.02") and \
        rows[("deep", "base")]["verdict"] == "lower"
    with pytest.raises(ValueError, match="'tall' is not a variant .*: choose one of base, wide, deep"):
        write_sweep_report(sweep, tmp_path / "report2", baseline="tall")


def test_the_spec_and_bases_are_named_relative_to_the_current_directory_where_inside_it(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    runs = [plant_run(sweep, variant, seed, [5.0, 4.0]) for variant in ("base", "wide") for seed in (1, 2)]
    write_manifest(sweep, runs, ["base", "wide"], [1, 2])
    manifest = json.loads((sweep / "sweep.json").read_text())
    manifest.update(spec=str(tmp_path / "specs" / "wide.yaml"), base=[str(tmp_path / "configs" / "base.yaml"),
                                                                      "/elsewhere/scale.yaml"])
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    text = write_sweep_report(sweep, tmp_path / "report").read_text()
    assert "spec: `specs/wide.yaml`; base: `configs/base.yaml`, `/elsewhere/scale.yaml`" in text


def test_diverged_runs_are_left_out_and_named_stability_is_per_variant_and_json_is_strict(tmp_path):
    sweep = tmp_path / "sweep"
    runs = []
    for lr in (1e-3, 1e-2):
        for seed, effect in SEED_EFFECT.items():
            base = [5.0, 4.3 + effect, 4.0 + effect]
            runs.append(plant_run(sweep, "base", seed, base, lr, attn=40.0 if lr == 1e-2 else 8.0,
                                  spikes=(10, 20) if (lr, seed) == (1e-2, 2) else ()))
            if (lr, seed) == (1e-2, 3):
                runs.append(plant_run(sweep, "qk", seed, [5.0, 7.5, math.nan], lr, status="diverged"))
            else:
                runs.append(plant_run(sweep, "qk", seed, [v - 0.05 for v in base], lr, attn=6.0))
    write_manifest(sweep, runs, ["base", "qk"], [1, 2, 3], [1e-3, 1e-2])

    text = write_sweep_report(sweep, tmp_path / "report").read_text()
    rows = table_rows(text)
    assert rows[("qk", "0.001")]["verdict"] == "lower"
    assert rows[("qk", "0.01")]["verdict"] == "lower; left out: seed 3 (variant diverged)"
    assert rows[("qk", "0.01")]["Δ vs baseline (paired)"].endswith("(2 seeds)")
    assert rows[("qk", "0.01")]["diverged (steps)"] == "1 (20)"
    per_variant = table_rows(text, "| variant | LR sensitivity")
    base = next(row for (variant, _), row in per_variant.items() if variant == "base")
    qk = next(row for (variant, _), row in per_variant.items() if variant == "qk")
    assert base["max attn logit (LR)"] == "40 (lr 0.01)" and qk["max attn logit (LR)"] == "6 (lr 0.001)"
    assert base["max output logit (LR)"] == "12 (lr 0.001)"
    assert base["spikes (runs with any)"] == "2 (1/6)" and qk["spikes (runs with any)"] == "0 (0/6)"
    assert qk["diverged runs"] == "1/6 (lr 0.01 seed 3 at 20)" and base["diverged runs"] == "0/6"

    def refuse(constant: str) -> None:
        raise AssertionError(f"summary.json holds {constant}, which is not JSON")

    data = json.loads((tmp_path / "report" / "summary.json").read_text(), parse_constant=refuse)
    cell = next(c for c in data["cells"] if c["variant"] == "qk" and c["lr"] == 1e-2)
    assert cell["vs_baseline"]["verdict"].startswith("lower") and cell["vs_baseline"]["seeds"] == [1, 2]
    assert cell["vs_baseline"]["diverged"] == {"variant": [3], "baseline": []}
    diverged = next(r for r in data["runs"] if r["key"] == "qk/lr0.01/seed3")
    assert diverged["summary"]["final_val_loss"] is None  # NaN written as null
    assert json.loads(strict_json({"a": [math.inf, -math.inf, 1.5]})) == {"a": [None, None, 1.5]}


def test_a_run_at_the_unigram_level_is_stalled_left_out_of_the_pairs_and_named(tmp_path, prepared_corpus):
    # Post-norm without warmup as it ran on the GPU: it stays at the loss of token frequencies for the whole run.
    shards = prepared_corpus["shards"]
    level = unigram_entropy(shards)
    sweep = tmp_path / "sweep"
    runs = []
    for seed, effect in SEED_EFFECT.items():
        base = [5.0, 3.0 + effect, 2.5 + effect]
        runs.append(plant_run(sweep, "pre", seed, base, data_dir=shards))
        stuck = [level + 0.3, level + 0.2, level + 0.15]
        runs.append(plant_run(sweep, "post", seed, stuck if seed == 3 else [v - 0.07 for v in base], data_dir=shards))
    write_manifest(sweep, runs, ["pre", "post"], [1, 2, 3])

    text = write_sweep_report(sweep, tmp_path / "report").read_text()
    assert f"- Unigram level (stalled at or above it): {level:.3f} nats, the val split of `{shards}`" in text
    assert "- Runs: 6; 5 finished, 1 stalled, 0 diverged" in text
    row = table_rows(text)[("post", "base")]
    assert row["verdict"] == "lower; left out: seed 3 (variant stalled)" and row["runs ok"] == "2/3"
    assert row["Δ vs baseline (paired)"] == "-0.070 ± 0.000 (2 seeds)"
    post = next(r for (variant, _), r in table_rows(text, "| variant | LR sensitivity").items() if variant == "post")
    assert post["stalled runs"] == "1/3 (seed 3)" and post["diverged runs"] == "0/3"
    assert "| `post/seed3` | stalled |" in text
    data = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert next(c for c in data["cells"] if c["variant"] == "post")["vs_baseline"]["stalled"] == \
        {"variant": [3], "baseline": []}

    # Without the shards (another machine): nothing is marked, and the header says why.
    moved = tmp_path / "elsewhere"
    for config in sweep.glob("*/seed*/config.yaml"):
        config.write_text(f"data:\n  data_dir: {moved}\n")
    text = write_sweep_report(sweep, tmp_path / "report2").read_text()
    assert f"(stalled at or above it): not checked, no val split readable at `{moved}` from here" in text
    assert table_rows(text)[("post", "base")]["verdict"] == "no difference"  # the stalled seed's +4 nats inside


def test_curves_named_by_the_spec_or_the_command_are_tabled_and_plotted(tmp_path):
    # The attention logit planted by plant_run rises linearly to `attn` at the last step: 5 -> 20 over 4 points
    # for wd0 and 5 -> 10 for wd0.1 (first value attn / 4).
    sweep = tmp_path / "sweep"
    runs = [plant_run(sweep, "wd0", seed, [5.0, 4.5, 4.2, 4.0], attn=20.0) for seed in (1, 2)]
    runs += [plant_run(sweep, "wd0.1", seed, [5.0, 4.5, 4.2, 4.0], attn=10.0) for seed in (1, 2)]
    write_manifest(sweep, runs, ["wd0", "wd0.1"], [1, 2])
    manifest = json.loads((sweep / "sweep.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({**manifest, "curves": ["stability/attn_logit_max/layer_00"]}))

    text = write_sweep_report(sweep, tmp_path / "report", curves=("stability/logits/max_abs", "no/such_tag"))
    text = text.read_text()
    assert "## Over training: `stability/attn_logit_max/layer_00`" in text
    assert "| wd0 | base | 2 | 5.000 ± 0.000 | 20.000 ± 0.000 (30) | 4.000 ± 0.000 |" in text
    assert "| wd0.1 | base | 2 | 2.500 ± 0.000 | 10.000 ± 0.000 (30) | 4.000 ± 0.000 |" in text
    assert "## Over training: `stability/logits/max_abs`" in text  # from the command, after the spec's
    assert "No finished run logged `no/such_tag`." in text
    png = tmp_path / "report" / "curve_stability_attn_logit_max_layer_00.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
