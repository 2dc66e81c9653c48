"""StepProfiler: real CPU fits write a report of exactly the steps recorded (a full window, a window cut short by the
end of training, none at all); the CUDA table, the matmul shape table and the device timeline, from entries shaped
as torch.profiler gives them, add up by hand; on CUDA a second, kernel-only window follows the first;
kernel_category sorts real Hopper kernel names."""

from __future__ import annotations

import re
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from llmtrain.callbacks import StepProfiler
from llmtrain.callbacks.profile import device_tables, device_timeline, kernel_category, matmul_shape_table
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig
from tests.callbacks import fit, random_batches, tiny_config

OPTIM = OptimConfig(lr=3e-3, warmup_steps=1, total_steps=40)


def top_ops(report: str) -> list[str]:
    return re.findall(r"^\| (aten::\S+) \|", report, flags=re.MULTILINE)


def test_a_full_window_reports_its_steps_and_the_ops_that_ran(tmp_path):
    output = tmp_path / "p.md"
    fit(LanguageModel(tiny_config(), OPTIM), random_batches(8),
        [StepProfiler(start_step=2, num_steps=2, output=str(output))], max_steps=6)
    report = output.read_text()
    assert report.startswith("# Step profile: CPU, 2 steps recorded, ")
    assert "needs CUDA" in report
    assert "aten::mm" in top_ops(report)  # the decoder's linear layers (bias-free) on CPU
    # The matmuls by shape: 4 x 16 tokens through the 32-wide projections (forward: activations times weight)
    table = report.split("matmuls by input shapes (self CPU time)")[1]
    assert re.search(r"^\| aten::mm \| \[64, 32\], \[32, 32\] \| \d+ \|", table, flags=re.MULTILINE), table
    assert re.search(r"^\| aten::mm \| \[64, 32\], \[32, 64\] \| \d+ \|", table, flags=re.MULTILINE)  # LM head


def test_gradient_accumulation_is_counted_in_optimizer_steps_and_the_default_path_is_the_log_dir(tmp_path):
    fit(LanguageModel(tiny_config(), OPTIM), random_batches(12), [StepProfiler(start_step=1, num_steps=2)],
        max_steps=4, accumulate_grad_batches=2, logger=False, default_root_dir=str(tmp_path))
    assert (tmp_path / "profile.md").read_text().startswith("# Step profile: CPU, 2 steps recorded, ")


def test_training_that_ends_inside_the_window_reports_the_steps_it_recorded(tmp_path):
    output = tmp_path / "p.md"
    fit(LanguageModel(tiny_config(), OPTIM), random_batches(8),
        [StepProfiler(start_step=2, num_steps=5, output=str(output))], max_steps=3)
    assert output.read_text().startswith("# Step profile: CPU, 1 steps recorded, ")


def test_a_start_step_never_reached_writes_nothing_and_warns(tmp_path):
    output = tmp_path / "p.md"
    with pytest.warns(UserWarning, match="start_step=10"):
        fit(LanguageModel(tiny_config(), OPTIM), random_batches(8),
            [StepProfiler(start_step=10, output=str(output))], max_steps=3)
    assert not output.exists()


def test_the_device_table_adds_kernel_self_time_by_category_and_skips_annotations() -> None:
    # key_averages() entries as torch gives them on CUDA (times in µs); CI has no GPU, so the figures are by hand
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def evt(key: str, us: float, device_type=cuda, annotation: bool = False) -> SimpleNamespace:
        return SimpleNamespace(key=key, count=4, self_device_time_total=us, device_type=device_type,
                               is_user_annotation=annotation)

    events = [evt("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", 6000.0), evt("sm90_xmma_gemm_bf16_cublas", 2000.0),
              evt("triton_red_fused_add_0", 1000.0), evt("Optimizer.step#AdamW.step", 5000.0, annotation=True),
              evt("aten::mm", 8000.0, device_type=cpu)]
    lines = device_tables(events, steps=2, wall_us=10_000.0, row_limit=2)
    assert "| matmul | 4.000 | 80.0 |" in lines
    assert "| compiled fused (triton) | 0.500 | 10.0 |" in lines
    assert "| device idle (wall − kernel time) | 0.500 | 10.0 |" in lines
    kernels = [line for line in lines if line.startswith(("| nvjet", "| sm90", "| triton", "| Optimizer", "| aten"))]
    assert kernels == ["| nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT | 4 | 6.000 | 3.000 | 60.0 |",
                       "| sm90_xmma_gemm_bf16_cublas | 4 | 2.000 | 1.000 | 20.0 |"]


def test_the_matmul_shape_table_ranks_matmul_ops_by_their_kernels_device_time() -> None:
    # key_averages(group_by_input_shape=True) entries of CPU ops on CUDA: device_time_total is their kernels' time
    def op(key: str, shapes: list, device_us: float, cpu_us: float = 50.0) -> SimpleNamespace:
        return SimpleNamespace(key=key, input_shapes=shapes, count=6, device_time_total=device_us,
                               self_cpu_time_total=cpu_us)

    events = [op("aten::mm", [[32768, 768], [768, 2304], []], 3000.0), op("aten::mm", [[32768, 768], [768, 768]],
              4000.0), op("aten::add_", [[32768, 768], [32768, 768]], 9000.0), op("aten::bmm", [[8, 64, 64]], 10.0)]
    lines = matmul_shape_table(events, steps=2, wall_us=20_000.0, row_limit=2, cuda=True)
    assert lines[1] == "## Top 2 matmuls by input shapes (device time of its kernels)"
    assert lines[-2:] == ["| aten::mm | [32768, 768], [768, 768] | 6 | 4.000 | 2.000 | 20.0 |",
                          "| aten::mm | [32768, 768], [768, 2304] | 6 | 3.000 | 1.500 | 15.0 |"]


@pytest.mark.parametrize("name, category", [
    (("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
      "__5x_cublas"), "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "matmul"),
    (("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
      "cutlass::bfloat16_t> >(...)"), "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "compiled fused (triton)"),
    (("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
      "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, ...>"),
     "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("Memcpy DtoD (Device -> Device)", "memory copies/sets"),
    ("Memset (Device)", "memory copies/sets"),
    ("void at::native::vectorized_elementwise_kernel<4, ...>", "other kernels"),
])
def test_kernel_category_of_hopper_kernels(name: str, category: str) -> None:
    assert kernel_category(name) == category


@pytest.mark.parametrize("kwargs, field", [
    ({"start_step": 0}, "start_step=0"), ({"start_step": 1, "num_steps": 0}, "num_steps=0"),
    ({"start_step": 1, "row_limit": 0}, "row_limit=0"),
])
def test_invalid_arguments_are_refused(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        StepProfiler(**kwargs)


class _QrAtBatchEnd(pl.Callback):
    """Work another callback does at the end of a batch, after StepProfiler's hooks in the list."""

    def on_train_batch_end(self, *args) -> None:
        torch.linalg.qr(torch.randn(8, 8))


def test_the_window_holds_the_batch_end_work_of_callbacks_listed_after_it(tmp_path):
    output = tmp_path / "p.md"
    fit(LanguageModel(tiny_config(), OPTIM), random_batches(8),
        [StepProfiler(start_step=2, num_steps=1, output=str(output), row_limit=500), _QrAtBatchEnd()], max_steps=5)
    assert "aten::linalg_qr" in top_ops(output.read_text())


def test_the_device_timeline_merges_streams_and_sorts_the_idle_gaps_by_length() -> None:
    # (name, start µs, end µs); "b" overlaps "a" on another stream, so the first gap comes after "b", the later end
    kernels = [("a", 0.0, 100.0), ("b", 50.0, 150.0), ("c", 153.0, 200.0), ("d", 220.0, 300.0), ("e", 400.0, 523.0),
               ("f", 1500.0, 1600.0)]
    lines = device_timeline(list(reversed(kernels)), steps=1, wall_us=2000.0, longest=2)
    assert "| kernels running | 0.500 | 25.0 |" in lines  # 150 + 47 + 80 + 123 + 100 µs
    assert "| idle between kernels | 1.100 | 55.0 |" in lines  # 3 + 20 + 100 + 977 µs
    assert "| idle before the first and after the last kernel | 0.400 | 20.0 |" in lines
    assert "6 kernels, copies and sets per step." in lines
    gaps = [line for line in lines if line.startswith(("| under", "| 5 to", "| 50 to", "| 500"))]
    assert [line.split(" | ")[1:3] for line in gaps] == [["1.0", "0.003"], ["1.0", "0.020"], ["1.0", "0.100"],
                                                          ["1.0", "0.977"]]
    assert lines[-2:] == ["| 977.0 | e | f |", "| 100.0 | d | e |"]


def test_a_timeline_of_no_kernels_says_so() -> None:
    assert device_timeline([], steps=2, wall_us=100.0)[-1] == "No kernel was recorded."


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_report_holds_the_kernel_tables_and_the_device_timeline(tmp_path):
    output = tmp_path / "p.md"
    fit(LanguageModel(tiny_config(), OPTIM), random_batches(10),
        [StepProfiler(start_step=2, num_steps=2, output=str(output))], max_steps=8, accelerator="gpu")
    report = output.read_text()
    assert "## Where the device time goes" in report and "| matmul |" in report
    assert "## Device timeline (the next steps, traced with kernel activity only)" in report
    assert re.search(r"^\| kernels running \| \d+\.\d{3} \|", report, flags=re.MULTILINE), report
    assert "Not available" not in report


class _FakeProfiler:
    """torch.profiler.profile as StepProfiler drives it, with one CUDA kernel per window and a host op."""

    made: list["_FakeProfiler"] = []

    def __init__(self, activities: list, record_shapes: bool) -> None:
        self.activities, self.record_shapes = activities, record_shapes
        _FakeProfiler.made.append(self)

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def key_averages(self, group_by_input_shape: bool = False) -> list:
        return []

    def events(self) -> list:
        def event(name: str, device_type) -> SimpleNamespace:
            return SimpleNamespace(name=name, device_type=device_type, is_user_annotation=False,
                                   time_range=SimpleNamespace(start=0.0, end=10.0))
        return [event("triton_poi_fused_0", torch.autograd.DeviceType.CUDA),
                event("cudaLaunchKernel", torch.autograd.DeviceType.CPU)]


@pytest.mark.parametrize("end_step, timeline_steps", [(9, 2), (5, 1)])
def test_on_cuda_a_kernel_only_window_follows_the_first(tmp_path, monkeypatch, end_step: int,
                                                        timeline_steps: int) -> None:
    # The window logic on a machine without a GPU: a module on "cuda", the CUDA calls and the profiler replaced
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a GPU")
    monkeypatch.setattr(torch.profiler, "profile", _FakeProfiler)
    _FakeProfiler.made = []
    output = tmp_path / "p.md"
    profiler = StepProfiler(start_step=2, num_steps=2, output=str(output))
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, log_dir=str(tmp_path))
    profiler.on_train_start(trainer, SimpleNamespace(device=torch.device("cuda")))
    for step in range(end_step):  # each step's batch start
        trainer.global_step = step
        profiler.on_train_batch_start(trainer, None, None, step)
    trainer.global_step = end_step
    profiler.on_train_end(trainer, None)
    cpu, cuda = torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA
    assert [(p.activities, p.record_shapes) for p in _FakeProfiler.made] == [([cpu, cuda], True), ([cuda], False)]
    report = output.read_text()
    assert report.startswith("# Step profile: a GPU, 2 steps recorded, ")
    assert "## Device timeline (the next steps, traced with kernel activity only)" in report
    # The second window's one kernel (10 µs; the host op is not a kernel) over the steps it recorded
    assert f"| kernels running | {0.010 / timeline_steps:.3f} |" in report
