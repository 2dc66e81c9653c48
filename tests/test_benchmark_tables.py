"""The tables the GPU benchmarks print, on hand-made values (the benchmarks themselves need a GPU)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from stability_overhead import pair_row, parity_table, split_cost  # noqa: E402
from throughput import MONITOR_INTERVAL, largest_micro_batch, monitored_step, profile_start  # noqa: E402


def test_parity_table_gives_the_worst_tags_first_median_and_max_relative_difference():
    plain = {"stability/grad_norm/global": {0: 1.0, 1: 2.0, 2: 3.0}, "stability/grad_norm/a": {0: 1.0, 1: 1.0, 2: 1.0},
             "stability/logits/mean": {0: 0.5, 1: 0.5, 2: 0.5}, "stability/spike/events": {0: 0.0}}
    zero = {"stability/grad_norm/global": {0: 1.1, 1: 2.0, 2: 6.0}, "stability/grad_norm/a": {0: 1.0, 1: 1.5, 2: 1.0},
            "stability/logits/mean": {0: 0.5, 1: 0.25, 2: 0.5}}
    rows = parity_table({"plain": plain, "ZeRO-1": zero}, "plain").splitlines()
    assert rows[0] == "| tag (family) | ZeRO-1 vs plain |"
    # grad_norm: worst tag per step 0.1/1.1, 0.5/1.5, 3/6 -> first 9.1e-02, median 3.3e-01, max 5.0e-01
    assert rows[2:] == ["| stability/grad_norm | 9.1e-02 / 3.3e-01 / 5.0e-01 |",
                        "| stability/logits/mean | 0.0e+00 / 0.0e+00 / 5.0e-01 |"]


def test_parity_table_marks_a_family_the_other_run_never_logged():
    rows = parity_table({"plain": {"stability/act_rms/0": {0: 1.0}}, "ZeRO-3": {}}, "plain").splitlines()
    assert rows[2] == "| stability/act_rms | missing |"


def test_split_cost_charges_the_monitored_windows_and_the_next_over_the_runs_own_median():
    windows = {s: 0.100 for s in range(52, 293, 10)}  # seconds per step of 10-step windows, logged at s
    windows[102] += 0.020  # steps 92-101 hold the monitored step 100
    windows[112] += 0.005  # work queued ahead lands in the next window
    windows[202] += 0.025  # step 200; 300 is past the run
    windows[152] += 0.001  # noise in an unmonitored window moves the median, not the cost
    cost = split_cost(windows, every=100)
    assert cost["median_step"] == pytest.approx(0.100)
    assert cost["monitored_cost"] == pytest.approx((0.020 + 0.005 + 0.025) * 10 / 2)  # 0.25 s per monitored step
    row = pair_row(windows, {s: 0.099 for s in windows}, every=100)
    assert row["share"] == pytest.approx(0.25 / (100 * 0.100))  # 2.5% of the steps between two monitored ones
    assert row["per_step"] == pytest.approx(0.100 / 0.099 - 1)
    assert row["split"] == pytest.approx(row["share"] + row["per_step"])


def test_largest_micro_batch_is_read_off_the_line_through_two_peaks_of_otherwise_equal_rows():
    rows = [{"shape": "1b", "impl": "llmtrain", "variant": v, "label": f"llmtrain ({v})", "micro_batch": mb,
             "peak_gib": peak} for v, mb, peak in [("shipped", 4, 26.1), ("mb2x", 8, 36.3), ("mb2x+fp8", 8, 29.0)]]
    lines = largest_micro_batch(rows, memory_gib=140.0)
    # (36.3 - 26.1) / 4 = 2.55 GiB per sequence, 15.9 GiB fixed; 0.95 x 140 = 133 GiB -> 45 sequences. The fp8
    # row has no fp8 row at the shipped micro-batch to pair with, so it gives no line.
    assert lines[-1] == "| 1b | llmtrain (mb2x) | 15.9 | 2.55 | 45 |" and "mb2x+fp8" not in "\n".join(lines)
    assert largest_micro_batch(rows, memory_gib=None) == []
    # Without a shipped row, the pair is the group's two larger micro-batches.
    pair = [{**r, "variant": v, "label": f"llmtrain ({v})", "micro_batch": mb, "peak_gib": peak}
            for r, (v, mb, peak) in zip(rows, [("mb4x+fp8", 16, 45.0), ("mb6x+fp8", 24, 61.0)])]
    assert largest_micro_batch(pair, memory_gib=140.0)[-1] == "| 1b | llmtrain (mb6x+fp8) | 13.0 | 2.00 | 60 |"


def _row(impl, variant, mb, tps, shape="350m"):
    return {"shape": shape, "impl": impl, "variant": variant, "label": impl, "micro_batch": mb,
            "tokens_per_sec": tps, "step_ms": 1.0, "peak_gib": 20.0, "flops_per_token": 1e9}


def test_every_ratio_is_taken_against_the_loop_at_the_same_micro_batch_and_precision():
    from throughput import same_recipe_ratios

    # llmtrain's configs clip their gradients: its rows compare with the clipping loop, the peers as they ran
    rows = [_row("baseline", "clip", 8, 100.0), _row("baseline", "fp8+clip", 8, 110.0),
            _row("baseline", "mb4x+clip", 32, 120.0), _row("llmtrain", "shipped", 8, 95.0),
            _row("llmtrain", "fp8", 8, 99.0), _row("llmtrain", "mb4x+fp8", 32, 150.0),
            _row("olmo_core", "fp8+clip", 8, 88.0), _row("torchtitan", "sdpa+clip", 8, 105.0),
            _row("llmtrain", "shipped", 8, 50.0, shape="124m"), _row("litgpt", "shipped", 8, 97.0)]
    ratios = same_recipe_ratios(rows)
    assert ratios[3] == pytest.approx(0.95) and ratios[7] == pytest.approx(1.05)  # bf16 at 8 against bf16 at 8
    assert ratios[4] == pytest.approx(0.9) and ratios[6] == pytest.approx(0.8)  # float8 against the loop's float8
    # No float8 loop at 32, no loop at 124m, no loop that skips clipping as this litgpt row does: no ratio
    assert 5 not in ratios and 8 not in ratios and 9 not in ratios
    unclipped = same_recipe_ratios([*rows, _row("baseline", "shipped", 8, 98.0)])
    assert unclipped[3] == pytest.approx(0.95) and unclipped[9] == pytest.approx(97.0 / 98.0)  # each to its own


def test_a_repeated_reference_loop_brackets_the_rows_and_its_runs_mean_is_the_reference():
    import argparse

    from throughput import drift_notes, planned_rows, same_recipe_ratios

    args = argparse.Namespace(only=["baseline", "olmo_core", "llmtrain"], variants=["shipped"],
                              baseline_variants=["clip"], repeat_reference=True)
    assert planned_rows(["124m"], args) == [("124m", "baseline", "clip", False), ("124m", "olmo_core", "clip", False),
                                            ("124m", "llmtrain", "shipped", False), ("124m", "baseline", "clip", True)]
    rows = [_row("baseline", "clip", 8, 100.0), _row("olmo_core", "clip", 8, 99.0), _row("llmtrain", "shipped", 8, 97.0),
            {**_row("baseline", "clip", 8, 96.0), "repeat": True}]
    ratios = same_recipe_ratios(rows)
    assert ratios[1] == pytest.approx(99.0 / 98.0) and ratios[2] == pytest.approx(97.0 / 98.0)
    assert drift_notes(rows) == ["Reference loop (350m, micro-batch 8, clipping) run first and last: 100 and 96 "
                                 "tokens/s (-4.0%); its rows' 'vs loop' is against the mean."]
    assert drift_notes(rows[:3]) == []  # one run: no spread to state


def test_the_clip_lever_clips_the_loop_rows_gradients_every_step(monkeypatch):
    import torch
    from throughput import loop

    calls = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, **kw: calls.append(max_norm) or clip(params, max_norm, **kw))
    for levers in ((), ("clip",)):
        loop("baseline", "tiny", micro_batch=2, steps=3, warmup=1, vocab_size=256, tiny=True, levers=levers)
    assert calls == [1.0, 1.0, 1.0]  # the clip row's three steps; the plain row clips nothing


def test_the_loop_rows_train_on_windows_of_the_llmtrain_rows_shards(prepared_corpus):
    import numpy as np
    import torch
    from throughput import loop, sample_windows, shard_tokens

    from llmtrain.data.shards import open_split, read_metadata

    shards = prepared_corpus["shards"]
    data = shard_tokens(str(shards), vocab_size=320)
    first = open_split(shards, read_metadata(shards), "train")[0].tokens
    assert data.dtype == torch.int64 and np.array_equal(data[:len(first)].numpy(), first)
    windows = sample_windows(torch.arange(1000), micro_batch=4, offsets=torch.arange(9),
                             gen=torch.Generator().manual_seed(0))
    assert windows.shape == (4, 9) and bool((windows.diff(dim=1) == 1).all())  # consecutive tokens
    result = loop("baseline", "tiny", micro_batch=2, steps=3, warmup=1, vocab_size=320, tiny=True, data=data)
    assert result["final_loss"] > 0
    with pytest.raises(SystemExit, match="320 tokens, --vocab_size is 32000"):
        shard_tokens(str(prepared_corpus["shards"]), vocab_size=32000)


def test_result_rows_give_mfu_against_the_datasheet_and_the_measured_ceiling_and_name_a_failure():
    from throughput import result_rows

    rows = [_row("baseline", "shipped", 8, 100_000.0), _row("llmtrain", "fp8", 8, 50_000.0),
            {**_row("torchtitan", "shipped", 8, 0.0), "tokens_per_sec": None}]
    del rows[2]["tokens_per_sec"]
    rows[2]["skipped"] = "import failed: no DataParallelMeshDims"
    lines = result_rows(rows, ceiling=500e12, tiny=False)
    # 1e5 tokens/s x 1e9 FLOPs = 1e14: 10.1% of 989e12, 20.0% of the measured 500e12
    assert lines[2] == "| 350m | baseline | 8 | bf16 | 100,000 | 10.1% | 20.0% | 1.0 | 20.0 | 1.000 |"
    assert lines[3].startswith("| 350m | llmtrain | 8 | float8 | 50,000 |") and lines[3].endswith("| - |")
    assert "import failed: no DataParallelMeshDims" in lines[4]


def test_the_sdpa_lever_makes_torchtitan_rows_only():
    import argparse

    from throughput import rows

    args = argparse.Namespace(only=["baseline", "torchtitan", "llmtrain"], variants=["shipped"],
                              baseline_variants=["shipped", "sdpa", "fp8"])
    assert rows(args) == [("baseline", "shipped"), ("baseline", "fp8"), ("torchtitan", "shipped"),
                          ("torchtitan", "sdpa"), ("torchtitan", "fp8"), ("llmtrain", "shipped")]


def test_torchtitan_gets_a_stand_in_for_the_one_fsdp_name_torch_2_11_lacks(monkeypatch):
    import torch.distributed.fsdp as fsdp
    from peers import with_data_parallel_mesh_dims

    present = fsdp.DataParallelMeshDims
    assert with_data_parallel_mesh_dims() is False and fsdp.DataParallelMeshDims is present  # a newer torch: kept
    monkeypatch.delattr(fsdp, "DataParallelMeshDims")  # torch 2.11
    assert with_data_parallel_mesh_dims() is True
    from torch.distributed.fsdp import DataParallelMeshDims  # what torchtitan.distributed.fsdp imports

    assert (DataParallelMeshDims | None) is not None  # its signatures evaluate `DataParallelMeshDims | None`


@pytest.mark.slow
@pytest.mark.parametrize("steps, start", [(100, 101), (97, 101), (60, 60), (150, 150)])
def test_the_profiled_steps_of_an_llmtrain_row_hold_no_monitored_step(steps: int, start: int):
    """StepProfiler's window, its kernel-only timeline included (2 x --profile steps on a GPU), starts after the timed
    window and skips the steps where WeightMonitor and the probes run; --profile_monitored's step comes after it."""
    import argparse

    args = argparse.Namespace(steps=steps, profile=3, tiny=False, profile_monitored=True)
    assert profile_start(args) == start
    assert all(step % MONITOR_INTERVAL for step in range(start, start + 6))
    assert monitored_step(args) % MONITOR_INTERVAL == 0 and monitored_step(args) >= start + 6


def test_llmtrain_rows_on_two_devices_with_the_host_reads_put_back(prepared_corpus, tmp_path):
    """The script end to end on CPU (two gloo ranks per llmtrain row): the callbacks of the hostreads and synclog
    levers are built into the fits and change no number; the rows are labelled with their devices."""
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    subprocess.run([sys.executable, str(script), "--tiny", "--only", "llmtrain", "--devices", "2",
                    "--variants", "shipped", "hostreads", "synclog", "--steps", "8", "--warmup", "2", "--data_dir",
                    str(prepared_corpus["shards"]), "--vocab_size", "320",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=600)
    shipped, hostreads, synclog = json.loads((tmp_path / "throughput.json").read_text())
    assert [shipped["label"], hostreads["label"], synclog["label"]] == [
        "llmtrain, 2 devices", "llmtrain (hostreads), 2 devices", "llmtrain (synclog), 2 devices"]
    assert shipped["final_loss"] == hostreads["final_loss"] == synclog["final_loss"]
    # In the fits' configs, whose callbacks the CLI builds (an import failure would fail the row).
    assert "host_reads.PerStepHostReads" in (tmp_path / "llmtrain_tiny_hostreads.yaml").read_text()
    assert "host_reads.LoggingStepReads" in (tmp_path / "llmtrain_tiny_synclog.yaml").read_text()
    assert "| llmtrain (hostreads), 2 devices | 8 | bf16 |" in (tmp_path / "throughput.md").read_text()


def test_gpu_state_is_summarised_over_a_rows_timed_window_only():
    from datetime import datetime

    from gpu_state import parse_samples, state_lines, window_summary

    text = ("2026/12/05 01:00:00.000, 1980, 40, 150.00\n"  # compiling: before the window
            "2026/12/05 01:00:01.000, 1980, 55, 650.50\n"
            "2026/12/05 01:00:01.500, 1755, 61, 699.90\n"
            "2026/12/05 01:00:02.000, 1830, 60, [N/A]\n"  # a value nvidia-smi could not read: skipped
            "2026/12/05 01:00:02.500, 1905, 58, 640.00\n"
            "2026/12/05 01:00:03.500, 1980, 45, 200.00\n"  # profiling: after it
            "2026/12/05 01:00:04.0")  # cut off when sampling stopped
    samples = parse_samples(text)
    assert len(samples) == 5
    start = datetime(2026, 12, 5, 1, 0, 1).timestamp()
    state = window_summary(samples, start, start + 1.6)
    assert state == {"sm_mhz_median": 1905.0, "sm_mhz_min": 1755.0, "temp_c_max": 61.0,
                     "power_w_mean": pytest.approx((650.5 + 699.9 + 640.0) / 3), "samples": 3}
    assert window_summary(samples, start + 10, start + 11) is None
    lines = state_lines([{"shape": "124m", "label": "llmtrain", "gpu_state": state}, {"shape": "124m", "label": "x"}])
    assert lines[-1] == "| 124m llmtrain | 1905 (1755) | 61 | 663 | 3 |" and len(lines) == 6


def test_without_nvidia_smi_the_sampler_has_no_samples_and_the_table_no_section(monkeypatch):
    from gpu_state import GpuSampler, state_lines

    monkeypatch.setenv("PATH", "")
    with GpuSampler() as sampler:
        pass
    assert sampler.samples == [] and state_lines([{"shape": "124m", "label": "loop", "gpu_state": None}]) == []


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs nvidia-smi (a GPU machine)")
def test_on_a_gpu_machine_the_sampler_reads_nvidia_smi():
    import time

    from gpu_state import GpuSampler, window_summary

    start = time.time()
    with GpuSampler(interval_ms=200) as sampler:
        time.sleep(2)
    state = window_summary(sampler.samples, start, time.time())
    assert state is not None and state["samples"] >= 3 and state["sm_mhz_median"] > 0, sampler.samples
