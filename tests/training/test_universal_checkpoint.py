"""A ZeRO folder resumes on another number of ranks through DeepSpeed's universal checkpoint:
`llmtrain convert --universal` writes it (or ZeroStrategy itself, with reshard_on_resume), ZeroStrategy.load_checkpoint
loads it into a DeepSpeed engine of another world size, and every parameter's fp32 master weight and Adam moments
come back whole and exact, with Lightning's entries (the step, loops, schedulers) beside them."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from llmtrain.checkpointing.convert import convert_main, convert_to_universal
from llmtrain.checkpointing.readers import CheckpointError, is_universal, load_consolidated
from llmtrain.checkpointing.resume import check_stage
from llmtrain.training.strategy import ZeroStrategy, place_adam_steps
from tests.conftest import run_deepspeed_ranks
from tests.test_checkpoint import random_decoder, save_lightning_style, tiny

# The resuming side: a fresh engine of this world size, loaded through ZeroStrategy.load_checkpoint exactly as
# Lightning calls it in a fit (Lightning itself refuses DeepSpeed on CPU, so the strategy gets the engine and the
# module by hand). Rank 0 compares each parameter's full state with what the writing run saved.
LOAD_SCRIPT = r"""
import json, os, sys
from types import SimpleNamespace
import torch, deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.trainer.states import TrainerFn
from llmtrain.model import ModelConfig
from llmtrain.training.module import LanguageModel
from llmtrain.training.strategy import ZeroStrategy

stage, folder, reference = int(sys.argv[1]), sys.argv[2], sys.argv[3]
module = LanguageModel(ModelConfig(**json.loads(sys.argv[4])))
bf16, reshard = sys.argv[5] == "bf16", sys.argv[6] == "reshard_on_resume"
ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
with deepspeed.zero.Init(config_dict_or_path=ds_config) if stage == 3 else torch.device("cpu"):
    module.configure_model()
engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds_config)
strategy = ZeroStrategy(stage=stage, reshard_on_resume=reshard)
strategy.cluster_environment = LightningEnvironment()  # the rank and world size, as Lightning sets them up
strategy.cluster_environment.set_global_rank(int(os.environ["RANK"]))
strategy.cluster_environment.set_world_size(int(os.environ["WORLD_SIZE"]))
strategy.parallel_devices = [torch.device("cpu")] * int(os.environ["WORLD_SIZE"])
strategy.model, strategy._lightning_module = engine, module
module._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
try:
    client_state = strategy.load_checkpoint(folder)
except RuntimeError as error:  # every rank reports it (the test of a failed conversion)
    print("refused:", error)
    client_state = None
full_state = lambda p: {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                        "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
loaded = {} if client_state is None else {name: full_state(p) for name, p in module.named_parameters()}
steps = {int(s["step"]) for s in engine.optimizer.optimizer.state.values()}
with deepspeed.zero.GatheredParameters(list(module.parameters())):
    module_weights = {name: p.detach().clone() for name, p in module.named_parameters()}
if client_state is not None and int(os.environ["RANK"]) == 0:
    expected = torch.load(reference, weights_only=True)
    assert set(loaded) == set(expected), sorted(set(loaded) ^ set(expected))
    for name, states in expected.items():
        for key, value in states.items():
            assert torch.equal(loaded[name][key], value), f"{name} {key}"
        # The weights the module computes with are made again from the master (rounded to bf16 under bf16).
        assert torch.equal(module_weights[name], states["fp32"].to(module_weights[name].dtype)), name
    assert client_state["global_step"] == 2 and client_state["llmtrain"]["tokens_seen"] == 64, client_state.keys()
    print("restored", len(loaded), "parameters; Adam steps", sorted(steps))
"""

TINY_JSON = json.dumps(asdict(tiny()))  # the model of the zero_folders checkpoints, for LOAD_SCRIPT


@pytest.mark.slow
@pytest.mark.parametrize("stage, saved_ranks, resumed_ranks, precision, via", [
    (2, 2, 1, "fp32", "convert"), (3, 2, 1, "fp32", "convert"), (2, 1, 2, "bf16", "convert"),
    (2, 1, 2, "bf16", "reshard_on_resume"), (3, 2, 1, "fp32", "reshard_on_resume"),
])
def test_universal_checkpoint_resumes_on_another_world_size(tmp_path: Path, zero_folders, stage: int,
                                                            saved_ranks: int, resumed_ranks: int, precision: str,
                                                            via: str) -> None:
    shared, _ = zero_folders(stage, saved_ranks, precision)
    folder = Path(shutil.copytree(shared, tmp_path / "step0000002.ckpt"))
    universal = tmp_path / "step0000002-universal.ckpt"  # where reshard_on_resume puts it
    if via == "convert":
        assert convert_main(["--universal", "--workers", "1", str(folder), str(universal)]) == 0
        assert (universal / "latest_universal").read_text() == "checkpoint" and not (universal / "latest").exists()
        assert not list(tmp_path.glob(".tmp.*"))  # the staging folder is gone
    loaded = universal if via == "convert" else folder
    outputs = run_deepspeed_ranks(LOAD_SCRIPT, [str(stage), str(loaded), str(shared.parent / "engine_weights.pt.adam"),
                                                TINY_JSON, precision, via], resumed_ranks)
    assert "restored" in outputs[0] and "Adam steps [2]" in outputs[0], outputs[0][-2000:]
    assert (universal / "latest_universal").is_file() and (folder / "latest").is_file()  # the source is untouched


@pytest.mark.slow
def test_a_failed_reshard_on_resume_is_raised_on_every_rank(tmp_path: Path, zero_folders) -> None:
    shared, _ = zero_folders(2, 1, "bf16")
    folder = Path(shutil.copytree(shared, tmp_path / "step0000002.ckpt"))
    (tmp_path / "step0000002-universal.ckpt").mkdir()  # in the way, and not a universal checkpoint
    args = ["2", str(folder), "unused", TINY_JSON, "bf16", "reshard_on_resume"]
    outputs = run_deepspeed_ranks(LOAD_SCRIPT, args, world_size=2)
    for output in outputs:  # rank 1 hears of rank 0's failure instead of waiting for it
        assert "refused: ZeroStrategy(reshard_on_resume=True): converting" in output, output[-2000:]
        assert "step0000002-universal.ckpt exists; convert --universal writes a new folder" in output
    assert not any((tmp_path / "step0000002-universal.ckpt").iterdir())  # nothing written into it


@pytest.mark.slow
def test_reshard_on_resume_reuses_its_copy_unless_the_step_was_saved_again(tmp_path: Path, zero_folders) -> None:
    shared, _ = zero_folders(2, 2)
    folder = Path(shutil.copytree(shared, tmp_path / "step0000002.ckpt"))
    (tmp_path / "last.ckpt").symlink_to(folder.name)
    strategy = ZeroStrategy(stage=2, reshard_on_resume=True)  # one process: rank 0 of a world of 1
    target = strategy._universal_copy(tmp_path / "last.ckpt")
    assert target == (tmp_path / "step0000002-universal.ckpt").resolve() and is_universal(target)
    made = (target / "latest_universal").stat().st_mtime_ns
    assert strategy._universal_copy(folder) == target and (target / "latest_universal").stat().st_mtime_ns == made
    time.sleep(0.01)
    (folder / "latest").write_text("checkpoint")  # the step saved again (after a rollback): the copy is stale
    strategy._universal_copy(folder)
    assert (target / "latest_universal").stat().st_mtime_ns > made and is_universal(target)


def test_convert_universal_refuses_a_file_a_broken_source_and_a_universal_source(tmp_path: Path) -> None:
    src = save_lightning_style(tmp_path / "model.ckpt", random_decoder(tiny()))
    with pytest.raises(CheckpointError, match="not a ZeRO checkpoint folder; a single-file checkpoint .* already "
                                              "resumes on any world size"):
        convert_to_universal(str(src), str(tmp_path / "u.ckpt"))
    folder = tmp_path / "zero.ckpt" / "checkpoint"
    folder.mkdir(parents=True)
    (folder.parent / "latest").write_text("checkpoint")
    with pytest.raises(CheckpointError, match="no \\*_model_states.pt"):
        convert_to_universal(str(folder.parent), str(tmp_path / "out.ckpt"))
    assert not (tmp_path / "out.ckpt").exists()
    universal = tmp_path / "u.ckpt"
    (universal / "checkpoint").mkdir(parents=True)
    (universal / "latest_universal").write_text("checkpoint")
    with pytest.raises(CheckpointError, match="a universal checkpoint without a rank-0 model states file"):
        load_consolidated(str(universal))
    with pytest.raises(CheckpointError, match="a universal checkpoint .*not a ZeRO folder: pass the ZeRO folder"):
        convert_to_universal(str(universal), str(tmp_path / "again.ckpt"))


@pytest.mark.parametrize("stage", [2, 3])
def test_convert_and_export_read_a_universal_folder_as_its_zero_folder(tmp_path: Path, zero_folders,
                                                                       stage: int) -> None:
    folder, _ = zero_folders(stage, 2)
    universal = convert_to_universal(str(folder), str(tmp_path / "u.ckpt"), workers=1)
    assert convert_main([str(universal), str(tmp_path / "weights.ckpt")]) == 0
    ours = torch.load(tmp_path / "weights.ckpt", weights_only=True)
    theirs = load_consolidated(str(folder))
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for name, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], value), name
    assert ours["global_step"] == theirs["global_step"] == 2
    assert ours["llmtrain"]["tokens_seen"] == theirs["llmtrain"]["tokens_seen"] == 64
    assert ours["converted_from"]["format"] == "deepspeed-universal" and ours["converted_from"]["zero_stage"] == stage
    next((universal / "checkpoint" / "zero").iterdir()).joinpath("fp32.pt").unlink()  # a damaged copy
    with pytest.raises(CheckpointError, match=r"no checkpoint/zero/.*/fp32.pt: the universal checkpoint is "
                                              "incomplete"):
        load_consolidated(str(universal))


def test_check_stage_refuses_a_zero3_folder_under_zero2_and_the_reverse(tmp_path: Path) -> None:
    for name, files, latest in (("z2.ckpt", ["mp_rank_00_model_states.pt"], "latest"),
                                ("z3.ckpt", ["zero_pp_rank_0_mp_rank_00_model_states.pt"], "latest_universal")):
        (tmp_path / name / "checkpoint").mkdir(parents=True)
        (tmp_path / name / latest).write_text("checkpoint")
        for file in files:
            (tmp_path / name / "checkpoint" / file).touch()
    check_stage(tmp_path / "z2.ckpt", 1)
    check_stage(tmp_path / "z2.ckpt", 2)
    check_stage(tmp_path / "z3.ckpt", 3)
    with pytest.raises(ValueError, match="z2.ckpt: written under ZeRO-1/2, this run uses ZeRO-3"):
        check_stage(tmp_path / "z2.ckpt", 3)
    with pytest.raises(ValueError, match="z3.ckpt: written under ZeRO-3, this run uses ZeRO-2"):
        check_stage(tmp_path / "z3.ckpt", 2)
    check_stage(tmp_path / "model.ckpt", 3)  # not a folder: nothing to say


def test_place_adam_steps_moves_fused_steps_to_the_parameters_device() -> None:
    """The universal loader leaves `step` on the CPU; fused AdamW needs it beside its parameter (the GPU there;
    the meta device stands in for it here). A foreach group keeps its CPU step, as torch's AdamW does."""
    fused, plain = torch.nn.Parameter(torch.empty(3, device="meta")), torch.nn.Parameter(torch.empty(3))
    optimizer = torch.optim.AdamW([{"params": [fused], "fused": True}, {"params": [plain], "foreach": True}])
    optimizer.state[fused]["step"] = torch.tensor(7.0, dtype=torch.float64)
    optimizer.state[plain]["step"] = torch.tensor(7.0)
    place_adam_steps(optimizer)
    assert optimizer.state[fused]["step"].device.type == "meta"
    assert optimizer.state[fused]["step"].dtype == torch.float32
    assert optimizer.state[plain]["step"].device.type == "cpu"
