import math

import pytest
import torch
from torch import nn

from llmtrain.training.optim import OptimConfig, build_optimizer, lr_lambda, param_groups


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: must be counted once


def _names(model: nn.Module, params: list) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_default_groups_decay_only_matrices():
    model = Tiny()
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1))}
    assert _names(model, groups["decay"]["params"]) == {"proj.weight"}
    assert _names(model, groups["no_decay"]["params"]) == {"emb.weight", "norm.weight", "norm.bias", "proj.bias"}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))  # tied weight once, nothing dropped


def test_switches_move_tensors_into_the_decayed_group():
    model = Tiny()
    config = OptimConfig(decay_norms=True, decay_biases=True, decay_embeddings=True)
    groups = {g["name"]: g for g in param_groups(model, config)}
    assert "no_decay" not in groups
    assert _names(model, groups["decay"]["params"]) == {n for n, _ in model.named_parameters()}


def test_weight_decay_really_applies_only_to_decayed_group():
    model = Tiny()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    optimizer.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["proj.weight"], before["proj.weight"] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(after["norm.weight"], before["norm.weight"])


def test_cosine_schedule_warmup_peak_and_floor():
    f = lr_lambda(OptimConfig(warmup_steps=10, min_lr_ratio=0.1, schedule="cosine"), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays_linearly():
    f = lr_lambda(OptimConfig(warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2), 100)
    assert f(50) == 1.0 and f(79) == 1.0
    assert f(90) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


@pytest.mark.parametrize("kwargs, field", [
    ({"schedule": "linear"}, "schedule"), ({"lr": 0}, "lr"), ({"beta2": 1.5}, "beta2"),
    ({"warmup_steps": 100, "total_steps": 50}, "total_steps"),
])
def test_invalid_optim_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**kwargs)


def test_cosine_is_monotone_after_warmup():
    f = lr_lambda(OptimConfig(warmup_steps=5), total_steps=50)
    values = [f(s) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert not math.isnan(sum(values))
