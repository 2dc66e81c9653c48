"""benchmarks/ablation_suite.py: derived specs (scaled warmup and d_ff, seeds), the time budget, and a --tiny CPU
run of one topic, two runs at once, down to the report tarball."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

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
    assert norm["grid"]["model.optim.warmup_steps"] == [5, 0]  # 500 of 10000 steps -> 5 of 100
    assert norm["lrs"] == [1.0e-3, 3.0e-3] and norm["seeds"] == [1, 2]
    assert norm["base"] == [str(REPO / "configs" / "ablations" / "base.yaml"), str(work / "specs" / "scale.yaml")]
    ffn = yaml.safe_load((work / "specs" / "ffn_activation.yaml").read_text())
    assert ffn["overrides"]["model.config.d_ff"] == 512  # 2048 = 4 x 512 at width 512 -> 4 x 128
    ratio = yaml.safe_load((work / "specs" / "ffn_ratio.yaml").read_text())
    assert [v["model.config.d_ff"] for v in ratio["variants"].values()] == [128, 256, 384, 512, 768]
    scale = yaml.safe_load((work / "specs" / "scale.yaml").read_text())
    assert scale["trainer"]["accelerator"] == "cpu" and scale["trainer"]["max_steps"] == 100
    assert scale["model"]["config"]["vocab_size"] == 320  # from the shards' metadata
    assert scale["model"]["compile"] == "off" and scale["model"]["optim"]["warmup_steps"] == 5
    plan = (out / "plan.md").read_text()
    assert "| norm_position | 4 | 0.001, 0.003 -> same | [1, 2, 3] -> [1, 2] | 24 -> 16 |" in plan
    assert "--topics group1" in plan and "--topics group2" in plan
    assert not (work / "sweeps").exists()  # a dry run runs nothing
    assert "Estimate" in result.stdout


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
    assert "metadata.json" in fails("--data_dir", str(tmp_path / "missing"))


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
    # Both runs were under way at the same time.
    spans = [(float(a), float(a) + float(b)) for a, b in
             re.findall(r"started \+(\d+) s, took (\d+) s", (out / "suite.log").read_text())]
    assert len(spans) == 2 and max(s for s, _ in spans) < min(e for _, e in spans), spans

    summary = (out / "summary.md").read_text()
    assert "# Topic: weight_decay" in summary
    assert "| wd0.1 | base | 1/1 |" in summary and "| wd0 | base | 1/1 |" in summary
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
    # wave of 2 instead of starting the other 3 position runs.
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
    assert "- Cancelled: 3, because the first wave of runs all failed" in (out / "summary.md").read_text()
    assert len(list((work / "sweeps" / "position").rglob("result.json"))) == 2  # no third run was started
