"""Under DeepSpeed ZeRO-3 the decoder is built partitioned (deepspeed.zero.Init): its init must still happen,
and give exactly the weights of a plain build from the same seed (a ZeRO-3 run and a single-device run then
start from the same model, so their curves and stability metrics are comparable), and the optimizer must put the
same tensors under weight decay although a partitioned parameter is an empty 1-d tensor."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_deepspeed_ranks

SCRIPT = r"""
import json, os, sys
import torch, deepspeed
from llmtrain.model import Decoder, ModelConfig
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig, param_groups


def groups(model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in param_groups(model, OptimConfig())}

config = ModelConfig(**json.loads(sys.argv[1]))
torch.manual_seed(0)
plain_model = Decoder(config)
plain = plain_model.state_dict()
deepspeed.init_distributed("gloo")
torch.manual_seed(0)
module = LanguageModel(config)
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
    module.configure_model()
assert all(p.numel() == 0 for p in module.model.parameters() if p.ds_numel > 1), "not partitioned"
with deepspeed.zero.GatheredParameters(list(module.parameters())):
    zero3 = {k.removeprefix("model."): v.clone() for k, v in module.state_dict().items()}
for key, value in plain.items():
    assert torch.equal(zero3[key], value), f"{key}: std {zero3[key].float().std():.4g} vs {value.float().std():.4g}"
assert groups(module.model) == groups(plain_model), (groups(module.model), groups(plain_model))
print("identical", len(plain))
"""

TINY = dict(vocab_size=96, max_seq_len=32, d_model=32, n_layer=2, n_head=4)


@pytest.mark.slow
@pytest.mark.parametrize("world_size, overrides", [
    (2, {}),
    (1, {"position": "learned", "tie_embeddings": True}),
    (2, {"norm": "layernorm", "bias": True, "ffn": "gelu"}),
])
def test_zero3_build_has_the_plain_build_init(world_size: int, overrides: dict) -> None:
    outputs = run_deepspeed_ranks(SCRIPT, [json.dumps(TINY | overrides)], world_size)
    assert all("identical" in output for output in outputs)
