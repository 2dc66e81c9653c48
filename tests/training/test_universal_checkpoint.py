"""A ZeRO folder resumes on another number of ranks through DeepSpeed's universal checkpoint:
`llmtrain convert --universal` writes it, ZeroStrategy.load_checkpoint loads it into a DeepSpeed engine of another
world size, and every parameter's fp32 master weight and Adam moments come back whole and exact, with Lightning's
entries (the step, loops, schedulers) beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint import CheckpointError, convert_main, convert_to_universal, load_consolidated
from llmtrain.training.strategy import check_stage
from tests.conftest import run_deepspeed_ranks
from tests.test_checkpoint import TINY, random_decoder, save_lightning_style, tiny

# The resuming side: a fresh engine of this world size, loaded through ZeroStrategy.load_checkpoint exactly as
# Lightning calls it in a fit (Lightning itself refuses DeepSpeed on CPU, so the strategy gets the engine and the
# module by hand). Rank 0 compares each parameter's full state with what the writing run saved.
LOAD_SCRIPT = r"""
import json, os, sys
from types import SimpleNamespace
import torch, deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from lightning.pytorch.trainer.states import TrainerFn
from llmtrain.model import ModelConfig
from llmtrain.training.module import LanguageModel
from llmtrain.training.strategy import ZeroStrategy

stage, folder, reference = int(sys.argv[1]), sys.argv[2], sys.argv[3]
module = LanguageModel(ModelConfig(**json.loads(sys.argv[4])))
bf16 = sys.argv[5] == "bf16"
ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
with deepspeed.zero.Init(config_dict_or_path=ds_config) if stage == 3 else torch.device("cpu"):
    module.configure_model()
engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds_config)
strategy = ZeroStrategy(stage=stage)
strategy.model, strategy._lightning_module = engine, module
module._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
client_state = strategy.load_checkpoint(folder)
loaded = {name: {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                 "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")} for name, p in module.named_parameters()}
steps = {int(s["step"]) for s in engine.optimizer.optimizer.state.values()}
with deepspeed.zero.GatheredParameters(list(module.parameters())):
    module_weights = {name: p.detach().clone() for name, p in module.named_parameters()}
if int(os.environ["RANK"]) == 0:
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


@pytest.mark.slow
@pytest.mark.parametrize("stage, saved_ranks, resumed_ranks, precision",
                         [(2, 2, 1, "fp32"), (3, 2, 1, "fp32"), (2, 1, 2, "bf16")])
def test_universal_checkpoint_resumes_on_another_world_size(tmp_path: Path, zero_folders, stage: int,
                                                            saved_ranks: int, resumed_ranks: int,
                                                            precision: str) -> None:
    folder, _ = zero_folders(stage, saved_ranks, precision)
    universal = tmp_path / "universal.ckpt"
    assert convert_main(["--universal", "--workers", "1", str(folder), str(universal)]) == 0
    assert (universal / "latest_universal").read_text() == "checkpoint" and not (universal / "latest").exists()
    assert not list(tmp_path.glob(".tmp.*"))  # the staging folder is gone
    fields = json.dumps({k: getattr(tiny(), k) for k in TINY} | {"tie_embeddings": False})
    outputs = run_deepspeed_ranks(LOAD_SCRIPT, [str(stage), str(universal), str(folder.parent / "engine_weights.pt.adam"),
                                                fields, precision], resumed_ranks)
    assert "restored" in outputs[0] and "Adam steps [2]" in outputs[0], outputs[0][-2000:]


def test_convert_universal_refuses_a_file_an_existing_destination_and_converting_back(tmp_path: Path) -> None:
    src = save_lightning_style(tmp_path / "model.ckpt", random_decoder(tiny()))
    with pytest.raises(CheckpointError, match="not a ZeRO checkpoint folder; a single-file checkpoint .* already "
                                              "resumes on any world size"):
        convert_to_universal(str(src), str(tmp_path / "u.ckpt"))
    folder = tmp_path / "zero.ckpt" / "checkpoint"
    folder.mkdir(parents=True)
    (folder.parent / "latest").write_text("checkpoint")
    (tmp_path / "exists.ckpt").mkdir()
    with pytest.raises(CheckpointError, match="no \\*_model_states.pt"):  # the source is checked first
        convert_to_universal(str(folder.parent), str(tmp_path / "exists.ckpt"))
    universal = tmp_path / "u.ckpt"
    (universal / "checkpoint").mkdir(parents=True)
    (universal / "latest_universal").write_text("checkpoint")
    with pytest.raises(CheckpointError, match="a universal checkpoint .* convert and export read the ZeRO folder"):
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
