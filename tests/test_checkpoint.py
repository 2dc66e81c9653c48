"""llmtrain.checkpointing.convert: ZeRO / single-file conversion, checked against the DeepSpeed engine's own fp32 weights
(Hugging Face export and import: tests/checkpointing/test_hf.py)."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from llmtrain.checkpointing.convert import convert_checkpoint, convert_main
from llmtrain.checkpointing.hf import llama_incompatibilities
from llmtrain.checkpointing.readers import CheckpointError, load_decoder, zero_world_size
from llmtrain.model import Decoder, ModelConfig
from llmtrain.training.module import LanguageModel
from llmtrain.checkpointing.resume import check_world_size
from tests.conftest import run_deepspeed_ranks

TINY: dict[str, Any] = dict(vocab_size=128, max_seq_len=64, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                            ffn_multiple_of=32, rope_theta=500.0, norm_eps=1e-6)


def tiny(**overrides: Any) -> ModelConfig:
    """d_model 64, 2 layers, 4 query heads sharing 2 kv heads (GQA), vocab 128; Llama recipe otherwise."""
    return ModelConfig(**{**TINY, **overrides})


def llmtrain_state(tokenizer: Optional[str] = None) -> dict[str, Any]:
    """The `llmtrain` entry as LanguageModel.on_save_checkpoint writes it."""
    return {"tokens_seen": 1024, "run_config": "model: {}\n", "tokenizer": tokenizer,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()[1], "cuda": []}}


def save_lightning_style(path: Path, model: Decoder, tokenizer: Optional[str] = None) -> Path:
    """A single-file checkpoint shaped like Lightning's (with an optimizer state to be dropped)."""
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    checkpoint = {
        "epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {}, "lr_schedulers": [],
        "optimizer_states": [optimizer.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": asdict(model.config), "z_loss_coef": 1e-4},
        "llmtrain": llmtrain_state(tokenizer),
    }
    torch.save(checkpoint, path)
    return path


def random_decoder(config: ModelConfig, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(config)
    with torch.no_grad():  # norms away from 1, so a swapped norm weight would show in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


# ----------------------------------------------------------------------------------------------- HF export


@pytest.mark.parametrize("override, field", [
    (dict(norm_position="post"), "norm_position='post'"),
    (dict(norm_position="sandwich"), "norm_position='sandwich'"),
    (dict(position="alibi"), "position='alibi'"),
    (dict(position="learned"), "position='learned'"),
    (dict(ffn="gelu"), "ffn='gelu'"),
    (dict(ffn="geglu"), "ffn='geglu'"),
    (dict(bias=True), "bias=True"),
    (dict(d_model=66, head_dim=16), "d_model=66 with n_head=4"),
])
def test_each_incompatibility_is_named_alone(override: dict[str, Any], field: str) -> None:
    problems = llama_incompatibilities(tiny(**override))
    assert len(problems) == 1 and problems[0].startswith(field)
    assert llama_incompatibilities(tiny()) == []


# ----------------------------------------------------------------------------------- single-file conversion


def fit_two_steps(path: Path) -> torch.nn.Module:
    """A real Lightning checkpoint: 2 optimizer steps of LanguageModel on CPU, saved by the Trainer."""
    import lightning.pytorch as pl

    torch.manual_seed(0)
    data = [{"input_ids": torch.randint(0, 128, (2, 16)), "labels": torch.randint(0, 128, (2, 16))}
            for _ in range(2)]
    module = LanguageModel(tiny(), optim={"warmup_steps": 1, "total_steps": 2})
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    trainer.save_checkpoint(path)
    return module.model


def test_convert_single_file_drops_optimizer_and_loads_weights_only(tmp_path: Path) -> None:
    model = fit_two_steps(tmp_path / "run.ckpt")
    original = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert original["optimizer_states"]  # there was something to drop

    assert convert_main([str(tmp_path / "run.ckpt"), str(tmp_path / "out" / "model.ckpt")]) == 0
    converted = torch.load(tmp_path / "out" / "model.ckpt", weights_only=True)
    assert "optimizer_states" not in converted and "lr_schedulers" not in converted and "loops" not in converted
    assert converted["hyper_parameters"] == original["hyper_parameters"]
    assert converted["llmtrain"]["tokens_seen"] == original["llmtrain"]["tokens_seen"]
    assert converted["converted_from"]["format"] == "lightning"
    assert not list((tmp_path / "out").glob(".tmp.*"))

    decoder, _ = load_decoder(str(tmp_path / "out" / "model.ckpt"))
    for key, value in model.state_dict().items():
        assert torch.equal(decoder.state_dict()[key], value), key
    reloaded = LanguageModel.load_from_checkpoint(tmp_path / "out" / "model.ckpt", weights_only=True)
    assert torch.equal(reloaded.model.tok_embeddings.weight, model.tok_embeddings.weight)


def test_convert_makes_bf16_weights_fp32(tmp_path: Path) -> None:
    model = random_decoder(tiny())
    src = save_lightning_style(tmp_path / "model.ckpt", model.to(torch.bfloat16))
    decoder, checkpoint = load_decoder(str(convert_checkpoint(str(src), str(tmp_path / "fp32.ckpt"))))
    assert all(v.dtype == torch.float32 for v in checkpoint["state_dict"].values())
    assert torch.equal(decoder.tok_embeddings.weight, model.tok_embeddings.weight.float())


class NotAllowed:
    """A pickled object: a checkpoint holding one cannot be loaded with weights_only=True."""


@pytest.mark.parametrize("make, error, match", [
    (lambda p: p, FileNotFoundError, "no such file or folder"),
    (lambda p: (p.mkdir(), p)[1], CheckpointError, "not a DeepSpeed checkpoint: no 'latest' file"),
    (lambda p: (p.write_text("hello"), p)[1], CheckpointError, "not a Lightning checkpoint"),
    (lambda p: (torch.save({"w": torch.ones(2)}, p), p)[1], CheckpointError, "no 'state_dict' entry"),
    (lambda p: (torch.save({"state_dict": {}, "x": NotAllowed()}, p), p)[1], CheckpointError,
     "weights_only=True.*NotAllowed"),
    (lambda p: (torch.save({"state_dict": {}, "hyper_parameters": {}}, p), p)[1], CheckpointError,
     r"no hyper_parameters\['config'\]"),
], ids=["missing", "plain-folder", "text-file", "plain-state-dict", "pickled-object", "no-config"])
def test_convert_refuses_bad_inputs_clearly(tmp_path: Path, make, error: type, match: str) -> None:
    src = make(tmp_path / "bad.ckpt")
    with pytest.raises(error, match=match):
        convert_checkpoint(str(src), str(tmp_path / "out.ckpt"))
    assert not (tmp_path / "out.ckpt").exists()


def test_convert_refuses_weights_that_do_not_fit_the_config(tmp_path: Path, capsys) -> None:
    src = save_lightning_style(tmp_path / "model.ckpt", random_decoder(tiny()))
    checkpoint = torch.load(src, weights_only=True)
    checkpoint["hyper_parameters"]["config"]["vocab_size"] = 256
    torch.save(checkpoint, src)
    assert convert_main([str(src), str(tmp_path / "out.ckpt")]) == 1
    err = capsys.readouterr().err
    assert "model.tok_embeddings.weight: weights (128, 64) vs config (256, 64)" in err
    assert "model.lm_head.weight: weights (128, 64) vs config (256, 64)" in err


# ------------------------------------------------------------------------------------------ ZeRO conversion

# Trains LanguageModel 2 steps under deepspeed.initialize on CPU (gloo) and saves the way Lightning's
# DeepSpeedStrategy.save_checkpoint does: engine.save_checkpoint(tag="checkpoint") with the Lightning
# checkpoint minus state_dict/optimizer_states as client state. Rank 0 also saves the engine's module weights, and
# next to them (`.adam`) every parameter's fp32 master weight and Adam moments.
ZERO_SCRIPT = r"""
import json, os, random, sys
from dataclasses import asdict
import torch, deepspeed
from llmtrain.model import ModelConfig
from llmtrain.training.module import LanguageModel

stage, folder, reference = int(sys.argv[1]), sys.argv[2], sys.argv[3]
config, bf16 = json.loads(sys.argv[4]), sys.argv[5] == "bf16"
torch.manual_seed(0)
module = LanguageModel(ModelConfig(**config))
ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
init = deepspeed.zero.Init(config_dict_or_path=ds_config) if stage == 3 else torch.device("cpu")
with init:
    module.configure_model()
engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds_config)
rank = int(os.environ["RANK"])
for step in range(2):
    ids = torch.randint(0, module.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank))
    loss = torch.nn.functional.cross_entropy(engine(ids).flatten(0, 1), ids.flatten())
    engine.backward(loss)
    engine.step()
client_state = {
    "epoch": 0, "global_step": 2, "pytorch-lightning_version": "2.6.6",
    "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 2}}},
    "callbacks": {}, "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": dict(module.hparams),
    "llmtrain": {"tokens_seen": 64, "run_config": None, "tokenizer": None,
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()[1], "cuda": []}},
}
engine.save_checkpoint(folder, client_state=client_state, tag="checkpoint")
with deepspeed.zero.GatheredParameters(list(module.parameters())):
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
adam = {name: {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")} for name, p in module.named_parameters()}
if rank == 0:
    torch.save(weights, reference)
    torch.save(adam, reference + ".adam")  # each parameter's fp32 master and Adam moments, whole
"""


def zero_checkpoint(tmp_path: Path, stage: int, world_size: int, config: ModelConfig,
                    precision: str = "fp32") -> tuple[Path, dict]:
    """A real ZeRO checkpoint folder written by `world_size` DeepSpeed processes, and the engine's module weights
    (the fp32 master weights themselves with precision fp32, their bf16 copy with bf16)."""
    folder, reference = tmp_path / f"zero{stage}.ckpt", tmp_path / "engine_weights.pt"
    fields = {k: getattr(config, k) for k in TINY} | {"tie_embeddings": config.tie_embeddings}
    run_deepspeed_ranks(ZERO_SCRIPT, [str(stage), str(folder), str(reference), json.dumps(fields), precision],
                        world_size)
    return folder, torch.load(reference, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage, world_size", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2)])
def test_convert_zero_folder_gives_the_engine_fp32_weights(tmp_path: Path, zero_folders, stage: int,
                                                           world_size: int) -> None:
    folder, engine_weights = zero_folders(stage, world_size)
    assert (folder / "checkpoint").is_dir() and (folder / "latest").read_text().strip() == "checkpoint"
    # Resuming pins the world size (ZeroStrategy.load_checkpoint): the same one passes, another is refused early.
    assert zero_world_size(folder) == world_size
    check_world_size(folder, world_size)
    with pytest.raises(ValueError, match=rf"written by {world_size} ranks, this run has {world_size + 1}\. .*"
                                         rf"trainer.devices x trainer.num_nodes = {world_size}"):
        check_world_size(folder, world_size + 1)

    out = convert_checkpoint(str(folder), str(tmp_path / "model.ckpt"))
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["converted_from"]["zero_stage"] == stage
    assert checkpoint["converted_from"]["world_size"] == world_size
    assert checkpoint["hyper_parameters"]["config"] == asdict(tiny())
    assert checkpoint["llmtrain"]["tokens_seen"] == 64 and "loops" not in checkpoint
    decoder, _ = load_decoder(str(out))
    state = decoder.state_dict()
    assert set(state) == {k.removeprefix("model.") for k in engine_weights}
    for key, value in engine_weights.items():
        assert torch.equal(state[key.removeprefix("model.")], value), key


@pytest.mark.slow
def test_convert_zero_bf16_gives_the_fp32_master_weights(tmp_path: Path, zero_folders) -> None:
    folder, engine_weights = zero_folders(2, 1, "bf16")
    decoder, _ = load_decoder(str(convert_checkpoint(str(folder), str(tmp_path / "model.ckpt"))))
    state = decoder.state_dict()
    for key, value in engine_weights.items():
        assert value.dtype == torch.bfloat16
        master = state[key.removeprefix("model.")]
        assert master.dtype == torch.float32 and torch.equal(master.bfloat16(), value), key  # bf16 = rounded master
    # ...and they are the master weights, not the bf16 copy cast back: they hold bits that bf16 drops.
    assert any(not torch.equal(state[k.removeprefix("model.")], v.float()) for k, v in engine_weights.items())


def test_convert_refuses_the_tag_folder_with_a_hint(tmp_path: Path) -> None:
    tag = tmp_path / "run.ckpt" / "checkpoint"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pass its parent"):
        convert_checkpoint(str(tag), str(tmp_path / "out.ckpt"))
    (tmp_path / "run.ckpt" / "latest").write_text("checkpoint")
    with pytest.raises(CheckpointError, match=r"no \*_optim_states.pt"):
        convert_checkpoint(str(tmp_path / "run.ckpt"), str(tmp_path / "out.ckpt"))
