"""benchmarks/ablation_suite.py: derived specs (scaled warmup and d_ff, seeds), the time budget, and a --tiny CPU
run of one topic, two runs at once, down to the report tarball."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from llmtrain.model.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "ablation_suite.py"


def suite(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SUITE), *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"ablation_suite {' '.join(args)} failed:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-4000:]}"
    return result


def test_derived_specs_scale_warmup_and_d_ff_and_keep_the_grid(prepared_corpus, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = suite("--dry_run", "--tiny", "--d_model", "128", "--steps", "100", "--seeds", "2",
                   "--topics", "norm_position", "ffn_activation", "ffn_ratio",
                   "--data_dir", str(prepared_corpus["shards"]), "--out", str(out), "--work", str(work))
    norm = yaml.safe_load((work / "specs" / "norm_position.yaml").read_text())
    assert norm["grid"]["model.optim.warmup_steps"] == [5, 0]  # 75 of the base's 1500 steps -> 5 of 100
    assert norm["lrs"] == [3.0e-3, 3.0e-2] and norm["seeds"] == [1, 2]
    assert norm["base"] == [str(REPO / "configs" / "ablations" / "base.yaml"), str(work / "specs" / "scale.yaml")]
    ffn = yaml.safe_load((work / "specs" / "ffn_activation.yaml").read_text())
    assert ffn["overrides"]["model.config.d_ff"] == 512  # 1024 = 4 x 256 at the base width 256 -> 4 x 128
    ratio = yaml.safe_load((work / "specs" / "ffn_ratio.yaml").read_text())
    assert [v["model.config.d_ff"] for v in ratio["variants"].values()] == [256, 336, 512]
    scale = yaml.safe_load((work / "specs" / "scale.yaml").read_text())
    assert scale["trainer"]["accelerator"] == "cpu" and scale["trainer"]["max_steps"] == 100
    assert scale["model"]["config"]["vocab_size"] == 320  # from the shards' metadata
    assert scale["model"]["config"]["d_ff"] == 336  # the base's 680 at width 256 -> 128 (steps of 8)
    assert scale["model"]["compile"] == "off" and scale["model"]["optim"]["warmup_steps"] == 5
    plan = (out / "plan.md").read_text()
    assert "| norm_position | 4 | 0.003, 0.03 | [1, 2, 3] -> [1, 2] | 24 -> 16 |" in plan
    # norm_position's pre-norm, warmed-up variant at the base LR and ffn_ratio's ratio2.67 are both the base:
    # one run per seed for the two (ffn_activation's GLUs are sized to 344 at this width, not the base's 336).
    assert "Runs: 30 (3 topics), 28 distinct" in plan
    assert not (work / "sweeps").exists()  # a dry run runs nothing
    assert "Estimate" in result.stdout
    # The assumed rate is model FLOP/s, turned into tokens/s by the base's FLOPs per token (another scale, another
    # tokens/s); the base here (d 128, 2 layers, d_ff 336, vocab 320, sequence 64): 2.78 MFLOP per token.
    flops = ModelConfig(vocab_size=320, max_seq_len=64, d_model=128, n_layer=2, n_head=2, d_ff=336).flops_per_token(64)
    rate = re.search(r"assumed ([\d.]+)M tokens/s over all concurrent runs, 185 TFLOP/s of model FLOPs", plan)
    assert rate and float(rate.group(1)) == pytest.approx(185e12 / flops / 1e6, abs=0.006)


def test_variants_and_lrs_select_part_of_a_topic_and_keep_its_baseline(prepared_corpus, tmp_path):
    # A second scale runs only the large effects: post-norm against the (kept) pre-norm baseline, QK-norm at the
    # high LR. The grid's names carry the warmup as scaled to --steps (75 of 1500 -> 5 of 100).
    out, work = tmp_path / "out", tmp_path / "work"
    suite("--dry_run", "--tiny", "--steps", "100", "--seeds", "2", "--topics", "norm_position", "qk_norm",
          "--variants", "norm_position:norm_position=post,warmup_steps=5", "--lrs", "3e-2",
          "--data_dir", str(prepared_corpus["shards"]), "--out", str(out), "--work", str(work))
    norm = yaml.safe_load((work / "specs" / "norm_position.yaml").read_text())
    assert list(norm["variants"]) == ["norm_position=pre,warmup_steps=5", "norm_position=post,warmup_steps=5"]
    assert norm["baseline"] == "norm_position=pre,warmup_steps=5" and "grid" not in norm and norm["lrs"] == [0.03]
    qk = yaml.safe_load((work / "specs" / "qk_norm.yaml").read_text())
    assert list(qk["variants"]) == ["no_qk_norm", "qk_norm"] and qk["lrs"] == [0.03]  # not named: all variants
    plan = (out / "plan.md").read_text()
    assert "| norm_position | 2 | 0.03 | [1, 2, 3] -> [1, 2] | 24 -> 4 |" in plan

    # LRs per topic: QK-norm at the high LR, post-norm at the base LR, z_loss (named by no item) keeps its grid.
    suite("--dry_run", "--tiny", "--seeds", "1", "--topics", "norm_position", "qk_norm", "z_loss",
          "--lrs", "qk_norm:3e-2", "norm_position:3e-3",
          "--data_dir", str(prepared_corpus["shards"]), "--out", str(out), "--work", str(work))
    lrs = {t: yaml.safe_load((work / "specs" / f"{t}.yaml").read_text())["lrs"]
           for t in ("norm_position", "qk_norm", "z_loss")}
    assert lrs == {"norm_position": [0.003], "qk_norm": [0.03], "z_loss": [0.003, 0.03]}


def test_shipped_base_is_what_its_header_says():
    """The base's comment states its size and token budget; the numbers are the config's."""
    sys.path.insert(0, str(REPO))
    from llmtrain.sweep import non_embedding_params

    base = yaml.safe_load((REPO / "configs" / "ablations" / "base.yaml").read_text())
    model = ModelConfig(**base["model"]["config"])
    tokens = base["trainer"]["max_steps"] * base["data"]["micro_batch_size"] * base["data"]["seq_len"]
    n = non_embedding_params(model, base["data"]["seq_len"])
    header = (REPO / "configs" / "ablations" / "base.yaml").read_text().split("seed_everything")[0]
    assert f"{n / 1e6:.1f}M non-embedding" in header and f"{model.num_params() / 1e6:.1f}M with" in header
    assert f"{tokens / 1e6:.1f}M tokens ({tokens / n:.1f} per N)" in header


def test_bad_arguments_are_named(prepared_corpus, tmp_path):
    def fails(*args: str) -> str:
        result = subprocess.run([sys.executable, str(SUITE), "--dry_run", "--tiny", *args, "--out", str(tmp_path)],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        return result.stderr

    shards = str(prepared_corpus["shards"])
    assert "--vocab_size 8192" in fails("--data_dir", shards, "--vocab_size", "8192")
    assert "'nope'" in fails("--data_dir", shards, "--topics", "nope")
    assert "--val_points 2" in fails("--data_dir", shards, "--steps", "7")
    assert "--reuse" in fails("--data_dir", shards, "--reuse", str(tmp_path / "missing"))
    assert "TOPIC:VARIANT" in fails("--data_dir", shards, "--topics", "bias", "--variants", "qk_norm:qk_norm")
    assert "not a variant of bias" in fails("--data_dir", shards, "--topics", "bias", "--variants", "bias:nope")
    assert "none of qk_norm's LRs" in fails("--data_dir", shards, "--topics", "qk_norm", "--lrs", "1e-4")
    assert "'bias' is not a topic" in fails("--data_dir", shards, "--topics", "qk_norm", "--lrs", "bias:3e-3")
    assert "positive learning rate" in fails("--data_dir", shards, "--topics", "qk_norm", "--lrs", "qk_norm:fast")
    assert "metadata.json" in fails("--data_dir", str(tmp_path / "missing"))


@pytest.mark.slow
def test_runs_with_the_same_settings_train_once_and_later_calls_reuse_them(prepared_corpus, tmp_path):
    # norm_type's layernorm run and bias's no_bias run have the same resolved settings (LayerNorm, no bias): one
    # trains, the other receives a copy; a second call with --reuse trains only what the first did not have.
    shards = str(prepared_corpus["shards"])
    first, second = tmp_path / "first", tmp_path / "second"
    suite("--tiny", "--topics", "norm_type", "bias", "--name", "a", "--data_dir", shards,
          "--out", str(first / "out"), "--work", str(first / "work"))
    log = (first / "out" / "suite.log").read_text()
    assert "bias no_bias/seed1: finished (the run of norm_type layernorm/seed1: same settings)" in log
    assert len(re.findall(r"started \+", log)) == 3  # rmsnorm, layernorm, bias: 3 of the 4 runs trained
    copied = json.loads((first / "work" / "sweeps" / "bias" / "no_bias" / "seed1" / "result.json").read_text())
    assert copied["variant"] == "no_bias" and copied["key"] == "no_bias/seed1" and copied["copied_from"]
    assert has_result((first / "out" / "summary.md").read_text(), "no_bias/seed1")

    with tarfile.open(first / "out" / "runs_a.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked")
    suite("--tiny", "--topics", "bias", "weight_decay", "--name", "b", "--data_dir", shards,
          "--reuse", str(tmp_path / "unpacked" / "runs_a"), "--out", str(second / "out"),
          "--work", str(second / "work"))
    log = (second / "out" / "suite.log").read_text()
    assert "reused from earlier calls: 3 of 5 runs" in log  # both bias runs and weight_decay's wd0.1 (the base)
    assert len(re.findall(r"started \+", log)) == 2  # wd0 and wd0.3 trained
    summary = (second / "out" / "summary.md").read_text()
    assert has_result(summary, "bias/seed1") and has_result(summary, "wd0.3/seed1")


def has_result(summary: str, key: str) -> bool:
    """The run is in a topic's run list with a final loss (a toy run of a few steps may be "stalled": it ends at
    the unigram level of its data, having learned nothing of the context; that is still a result)."""
    return re.search(rf"\| `{re.escape(key)}` \| (finished|stalled) \| \d", summary) is not None


@pytest.mark.slow
def test_a_zero_time_budget_starts_nothing_and_still_reports(prepared_corpus, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    suite("--tiny", "--topics", "bias", "--time_budget_s", "0", "--data_dir", str(prepared_corpus["shards"]),
          "--out", str(out), "--work", str(work))
    summary = (out / "summary.md").read_text()
    assert "Not started (the time budget would not have held them): 2" in summary
    assert "| no_bias | base | 0/1 (1 pending) |" in summary
    with tarfile.open(out / "ablations_custom.tar.gz") as tar:
        assert "ablations_custom/bias/summary.md" in tar.getnames()


@pytest.mark.slow
def test_tiny_suite_runs_two_at_once_and_packs_the_reports(prepared_corpus, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    suite("--tiny", "--topics", "weight_decay", "--parallel", "2", "--name", "call1",
          "--data_dir", str(prepared_corpus["shards"]), "--out", str(out), "--work", str(work))
    assert sorted(p.name for p in out.iterdir()) == ["ablations_call1.tar.gz", "plan.md", "runs_call1.tar.gz",
                                                     "suite.log", "summary.md"]
    # The first two runs were under way at the same time; the third waited for a free slot.
    spans = sorted((float(a), float(a) + float(b)) for a, b in
                   re.findall(r"started \+(\d+) s, took (\d+) s", (out / "suite.log").read_text()))
    assert len(spans) == 3 and max(s for s, _ in spans[:2]) < min(e for _, e in spans[:2]), spans
    assert spans[2][0] >= min(e for _, e in spans[:2]) - 1, spans

    summary = (out / "summary.md").read_text()
    assert "# Topic: weight_decay" in summary
    assert has_result(summary, "wd0.1/seed1") and has_result(summary, "wd0/seed1")
    assert "](weight_decay/val_loss_vs_tokens.png)" in summary
    assert "sharing one GPU" in summary  # concurrent tokens/s are flagged as not comparable
    with tarfile.open(out / "ablations_call1.tar.gz") as tar:
        names = tar.getnames()
        assert {"ablations_call1/weight_decay/summary.md", "ablations_call1/weight_decay/val_loss_vs_tokens.png",
                "ablations_call1/specs/weight_decay.yaml", "ablations_call1/specs/scale.yaml",
                "ablations_call1/summary.md"} <= set(names)
        png = tar.extractfile("ablations_call1/weight_decay/val_loss_vs_tokens.png").read()  # type: ignore
        assert png[:4] == b"\x89PNG"
    with tarfile.open(out / "runs_call1.tar.gz") as tar:
        names = tar.getnames()
        assert {"runs_call1/weight_decay/sweep.json", "runs_call1/weight_decay/wd0/seed1/result.json"} <= set(names)
        assert any("events.out.tfevents" in n for n in names) and not any("checkpoints" in n for n in names)
    # Finished runs leave no checkpoint behind (each is ~0.4 GB at the GPU scale).
    assert not list((work / "sweeps").rglob("*.ckpt"))


@pytest.mark.slow
def test_runs_still_going_at_the_time_budget_are_stopped_and_reported_pending(prepared_corpus, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # A zero start-up estimate lets both runs start; the 3 s budget ends them long before they finish.
    suite("--tiny", "--topics", "bias", "--time_budget_s", "3", "--assumed_overhead_s", "0",
          "--data_dir", str(prepared_corpus["shards"]), "--out", str(out), "--work", str(work))
    summary = (out / "summary.md").read_text()
    assert "Stopped at the time budget (pending in the reports): bias/no_bias/seed1, bias/bias/seed1" in summary
    assert "| bias | base | 0/1 (1 pending) |" in summary
    assert not list((work / "sweeps" / "bias").rglob("result.json"))


@pytest.mark.slow
def test_a_first_wave_that_all_fails_stops_the_suite(prepared_corpus, tmp_path):
    # A truncated shard fails every fit (a set-up error every run would repeat): the suite stops after the first
    # wave of 2 instead of starting the other 4 position runs.
    shards = tmp_path / "shards"
    shutil.copytree(prepared_corpus["shards"], shards)
    train = next(shards.glob("train_*.bin"))
    train.write_bytes(train.read_bytes()[:-64])
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run([sys.executable, str(SUITE), "--tiny", "--topics", "position", "--data_dir", str(shards),
                             "--out", str(out), "--work", str(work)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]  # failed runs: a non-zero exit
    log = (out / "suite.log").read_text()
    assert "the first 2 runs all failed: stopping the suite" in log
    assert "- Cancelled: 4, because the first wave of runs all failed" in (out / "summary.md").read_text()
    assert len(list((work / "sweeps" / "position").rglob("result.json"))) == 2  # no third run was started


def test_a_smaller_last_wave_starts_when_a_full_one_would_not_end_in_time():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablation_suite"] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        del sys.modules["ablation_suite"]
    args = argparse.Namespace(parallel=12, assumed_overhead_s=60.0)
    # A run that shared the device with 12 took 220 s: 60 s start-up and 160 s of training that shrinks with the
    # runs at once. 200 s left: a full wave does not fit, 8 runs (60 + 160 * 8 / 12 = 167 s) do, 11 do not.
    assert module.fits(12, 220.0, 230.0, args) and not module.fits(12, 220.0, 200.0, args)
    assert module.fits(8, 220.0, 200.0, args) and not module.fits(11, 220.0, 200.0, args)
    assert not module.fits(1, 220.0, 60.0, args)  # start-up alone does not fit
    # A run alone is counted as one of two: 60 + 160 * 2 / 12 = 87 s. Measured at 5 at once on the H200 (438 s,
    # 40 s of start-up): a run started alone with 132 s left did not end, which the linear model (120 s) allowed.
    assert module.fits(1, 220.0, 87.0, args) and not module.fits(1, 220.0, 86.0, args)
    args = argparse.Namespace(parallel=5, assumed_overhead_s=40.0)
    assert not module.fits(1, 438.0, 132.0, args) and module.fits(1, 438.0, 200.0, args)
    assert module.fits(5, 438.0, 438.0, args) and not module.fits(5, 438.0, 437.0, args)
