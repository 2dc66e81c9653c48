"""`llmtrain report`: from a real short `llmtrain fit` with the quickstart config's stability callbacks, and the
run summary (divergence, spikes) on hand-made event files."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from llmtrain.callbacks import SpikeDetector
from llmtrain.events import read_scalars
from llmtrain.report import DEFAULT_SPIKE_THRESHOLD, diverged_at, report_main, spike_threshold, summarize_run
from tests.conftest import llmtrain

REPO = Path(__file__).resolve().parents[2]
STABILITY_CALLBACKS = ("LogitMonitor", "AttentionMonitor", "WeightMonitor", "SpikeDetector")


def quickstart_with_intervals(path: Path, every: int) -> Path:
    """configs/quickstart.yaml with its stability callbacks every `every` steps and a spike threshold of 4.5
    (jsonargparse cannot override one entry of the callback list from the command line)."""
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    names = [cb["class_path"].rsplit(".", 1)[-1] for cb in config["trainer"]["callbacks"]]
    assert all(name in names for name in STABILITY_CALLBACKS), names
    for cb, name in zip(config["trainer"]["callbacks"], names):
        if name in STABILITY_CALLBACKS[:3]:
            cb["init_args"]["every_n_steps"] = every
        if name == "SpikeDetector":
            cb["init_args"]["threshold"] = 4.5
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_report_of_a_real_run(prepared_corpus, tmp_path):
    config = quickstart_with_intervals(tmp_path / "quickstart.yaml", every=2)
    llmtrain("fit", "--config", str(config), "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
             "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
             "--trainer.logger.init_args.name", "run", "--model.config.vocab_size", "320",
             "--model.config.d_model", "32", "--model.config.n_layer", "2", "--model.config.n_head", "2",
             "--model.config.max_seq_len", "32", "--model.optim.total_steps", "6", "--model.optim.warmup_steps", "1",
             "--data.data_dir", str(prepared_corpus["shards"]), "--data.seq_len", "32",
             "--data.micro_batch_size", "4", "--data.global_batch_size", "4", "--data.num_workers", "0", cwd=REPO)
    run = tmp_path / "run"
    scalars = read_scalars(run)
    expected = ["stability/logits/max_abs", "stability/logits/mean", "stability/logits/std",
                "stability/logits/logsumexp_mean", "stability/logits/logsumexp_max", "stability/logits/z_loss",
                "stability/weight_rms/global", "stability/grad_norm/global", "stability/update_ratio/global",
                "stability/weight_rms/blocks.0.attn.q_proj.weight", "stability/grad_norm/lm_head.weight",
                "stability/update_ratio/blocks.1.ffn.down_proj.weight", "stability/spike/score"]
    expected += [f"stability/{kind}/layer_{i:02d}" for kind in ("attn_logit_max", "attn_entropy", "act_rms")
                 for i in (0, 1)]
    for tag in expected:
        assert tag in scalars, f"{tag} not logged; have {sorted(t for t in scalars if 'stability' in t)}"
    assert sorted(scalars["stability/logits/max_abs"]) == [0, 2, 4]
    assert sorted(scalars["stability/spike/score"]) == list(range(6))

    out = tmp_path / "report"
    assert report_main([str(run), "--out", str(out)]) == 0
    for name in ("loss", "logit_max", "attn_logit_max", "weight_rms", "update_ratio", "spike_score"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = summarize_run(run)
    assert summary["steps"] == 6 and summary["diverged"] is False and summary["spikes"] == 0
    attn = [max(scalars[f"stability/attn_logit_max/layer_{i:02d}"].values()) for i in (0, 1)]
    assert summary["max_attn_logit"] == max(attn) and summary["max_attn_logit_layer"] == attn.index(max(attn))
    assert summary["max_output_logit"] == max(scalars["stability/logits/max_abs"].values())
    text = (out / "summary.md").read_text()
    assert "| run | 6 |" in text and "![attn_logit_max](attn_logit_max.png)" in text
    # The last validation's loss and bpb, and the threshold the run's config.yaml gave SpikeDetector.
    final_val = scalars["val/loss"][max(scalars["val/loss"])]
    assert summary["final_val_loss"] == final_val and f"| {final_val:.3f} |" in text
    assert math.isfinite(summary["final_val_bpb"]) and f"| {summary['final_val_bpb']:.3f} |" in text
    assert "final train loss (mean of last 10 logged)" in text
    assert "Spike threshold (dashed on the spike-score plot): run 4.5 (config.yaml)." in text
    assert "hp_metric" not in scalars  # the config's logger has default_hp_metric: false


def write_run(folder: Path, loss: list[float], events: tuple[int, ...] = (), attn: float = 3.0) -> Path:
    writer = SummaryWriter(str(folder))
    for step, value in enumerate(loss):
        writer.add_scalar("train/loss", value, step)
        writer.add_scalar("stability/spike/score", 1.0, step)
        writer.add_scalar("stability/attn_logit_max/layer_00", attn * (1 + step), step)
        writer.add_scalar("stability/attn_logit_max/layer_01", attn, step)
    for step in events:
        writer.add_scalar("stability/spike/events", 1.0, step)
    writer.close()
    return folder


def test_divergence_is_where_the_loss_leaves_its_best_for_good():
    assert diverged_at({0: 5.0, 1: 4.0, 2: 3.5, 3: 4.2, 4: 4.6, 5: 5.0}) == 4  # 4.6 > 3.5 + 1.0, to the end
    assert diverged_at({0: 5.0, 1: 4.0, 2: math.nan, 3: math.nan}) == 2
    assert diverged_at({0: 5.0, 1: 4.0, 2: 6.5, 3: 3.9}) is None  # a bump it recovers from
    assert diverged_at({0: 5.0, 1: 4.0, 2: 3.9}) is None


def test_report_of_two_runs_overlays_them_and_summarizes_each(tmp_path):
    stable = write_run(tmp_path / "qk_norm", [5.0, 4.0, 3.5, 3.2, 3.0])
    diverged = write_run(tmp_path / "baseline", [5.0, 4.0, 3.5, 6.0, math.nan], events=(3, 4), attn=20.0)
    summary = summarize_run(diverged)
    assert summary["diverged_at"] == 3 and summary["spikes"] == 2 and summary["min_loss"] == 3.5
    assert math.isnan(summary["final_train_loss"])  # the window holds the final NaN: never hidden
    assert summarize_run(stable)["final_train_loss"] == pytest.approx((5.0 + 4.0 + 3.5 + 3.2 + 3.0) / 5)
    (diverged / "config.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "llmtrain.callbacks.SpikeDetector", "init_args": {"action": "log"}}]}}))
    assert summary["max_attn_logit"] == 100.0 and summary["max_attn_logit_layer"] == 0
    assert math.isnan(summary["max_output_logit"])  # not logged: NaN, never 0
    out = tmp_path / "report"
    assert report_main([str(stable), str(diverged), "--out", str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "| qk_norm | 5 | 3.740 | 3.000 (4) | nan | nan |" in text  # nan: no validation logged
    assert "yes, at step 3" in text
    assert ("Spike threshold (dashed on the spike-score plot): qk_norm 6 (SpikeDetector's default: no config.yaml "
            "in the run folder); baseline 6 (SpikeDetector's default: config.yaml sets none).") in text
    assert (out / "loss.png").is_file() and not (out / "logit_max.png").exists()
    assert "Not logged in these runs: output logits" in text


def test_the_default_spike_threshold_is_spike_detectors(tmp_path):
    assert DEFAULT_SPIKE_THRESHOLD == inspect.signature(SpikeDetector).parameters["threshold"].default
    (tmp_path / "config.yaml").write_text("trainer: {callbacks: [{class_path: llmtrain.callbacks.Throughput}]}")
    assert spike_threshold(tmp_path) == (6.0, "SpikeDetector's default: config.yaml has no SpikeDetector")
