"""The Decoder: masking, packed documents, every switch, init, dtype, overfitting, and parity with HF Llama/Qwen3."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmtrain.model import Decoder, ModelConfig
from llmtrain.model.config import POSITION_CHOICES


def build(config: ModelConfig, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(config)


def tokens(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- masking

BACKENDS = ["sdpa", "eager", "flex"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("position", POSITION_CHOICES)
def test_future_tokens_never_change_earlier_logits(tiny, eager_flex, position: str, backend: str) -> None:
    model = build(tiny(position=position, attention_backend=backend, init_std=0.3))
    x = tokens()
    changed = x.clone()
    changed[:, 10] = (x[:, 10] + 1) % 64
    with torch.no_grad():  # flex has no CPU backward
        before, after = model(x), model(changed)
    torch.testing.assert_close(after[:, :10], before[:, :10], atol=1e-6, rtol=0)
    assert (after[:, 10:] - before[:, 10:]).abs().amax() > 1e-3  # the change does reach later positions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("position", POSITION_CHOICES)
def test_other_documents_never_change_logits(tiny, eager_flex, packed, position: str, backend: str) -> None:
    model = build(tiny(position=position, attention_backend=backend, init_std=0.3))
    docs, pos = packed  # row 0: documents at 0-4, 5-11, 12-15
    x = tokens()
    changed = x.clone()
    changed[0, 2] = (x[0, 2] + 1) % 64  # inside document 0 of row 0
    with torch.no_grad():
        before, after = model(x, docs, pos), model(changed, docs, pos)
    unaffected = torch.ones(2, 16, dtype=torch.bool)
    unaffected[0, 2:5] = False  # the rest of document 0
    torch.testing.assert_close(after[unaffected], before[unaffected], atol=1e-6, rtol=0)
    assert (after[0, 2:5] - before[0, 2:5]).abs().amax() > 1e-3


@pytest.mark.parametrize("position", POSITION_CHOICES)
def test_packed_document_equals_document_alone(tiny, packed, position: str) -> None:
    """Document masking + restarting position_ids make a packed document see exactly what it would alone."""
    model = build(tiny(position=position, init_std=0.3))
    docs, pos = packed
    x = tokens()
    packed_logits = model(x, docs, pos)
    for start, end in [(0, 5), (5, 12), (12, 16)]:
        alone = model(x[:1, start:end])
        torch.testing.assert_close(packed_logits[:1, start:end], alone, atol=1e-5, rtol=1e-5)


def test_default_positions_and_single_document_change_nothing(tiny) -> None:
    model = build(tiny(position="alibi", init_std=0.3))
    x = tokens()
    reference = model(x)
    torch.testing.assert_close(model(x, position_ids=torch.arange(16).repeat(2, 1)), reference)
    torch.testing.assert_close(model(x, document_ids=torch.zeros(2, 16, dtype=torch.long)), reference)


def test_ids_with_wrong_shape_are_refused(tiny) -> None:
    with pytest.raises(ValueError, match="document_ids has shape"):
        build(tiny())(tokens(), document_ids=torch.zeros(2, 8, dtype=torch.long))


# ------------------------------------------------------------------------------------------- switches

SWITCHES = {  # name -> overrides flipped from the tiny Llama default
    "norm=layernorm": dict(norm="layernorm"),
    "norm_position=post": dict(norm_position="post"),
    "norm_position=sandwich": dict(norm_position="sandwich"),
    "bias": dict(bias=True),
    "ffn=relu": dict(ffn="relu"),
    "ffn=gelu": dict(ffn="gelu"),
    "ffn=silu": dict(ffn="silu"),
    "ffn=geglu": dict(ffn="geglu"),
    "ffn=reglu": dict(ffn="reglu"),
    "position=learned": dict(position="learned"),
    "position=sinusoidal": dict(position="sinusoidal"),
    "position=alibi": dict(position="alibi"),
    "position=none": dict(position="none"),
    "rope_theta": dict(rope_theta=100.0),
    "qk_norm": dict(qk_norm=True),
    "attn_logit_softcap": dict(attn_logit_softcap=0.5),
    "final_logit_softcap": dict(final_logit_softcap=1.0),
    "gqa": dict(n_kv_head=2),
    "head_dim": dict(head_dim=4),
    "tie_embeddings": dict(tie_embeddings=True),
}


def train(model: Decoder, steps: int, lr: float, x: torch.Tensor, y: torch.Tensor, stop_below: float = 0.0
          ) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            unused = [n for n, p in model.named_parameters() if p.grad is None]
            assert not unused, f"parameters without gradient: {unused}"
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < stop_below:
            break
    return losses


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_switch_trains(tiny, switch: str) -> None:
    model = build(tiny(**SWITCHES[switch]))
    x, y = tokens(4, 16, seed=1), tokens(4, 16, seed=2)
    losses = train(model, 5, 1e-2, x, y)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_switch_changes_the_computation(tiny, switch: str) -> None:
    """Same weights wherever names and shapes match; then the flipped switch alone must move the logits
    (or, for biases, which start at zero, the parameter count)."""
    base = build(tiny(init_std=0.3))
    flipped = build(tiny(init_std=0.3, **SWITCHES[switch]))
    state = flipped.state_dict()
    state.update({n: t for n, t in base.state_dict().items() if n in state and state[n].shape == t.shape})
    flipped.load_state_dict(state)
    n_base, n_flipped = (sum(p.numel() for p in m.parameters()) for m in (base, flipped))
    x = tokens()
    with torch.no_grad():
        difference = (base(x) - flipped(x)).abs().amax().item()
    if switch == "bias":
        assert n_flipped > n_base
    else:
        assert difference > 1e-3, f"{switch} left the logits unchanged ({difference:.2e})"


# ------------------------------------------------------------------------------------ head and init


def test_tied_head_uses_the_embedding(tiny) -> None:
    model = build(tiny(tie_embeddings=True))
    assert model.lm_head is None
    hidden = model.trunk(tokens())
    torch.testing.assert_close(model.head(hidden), hidden @ model.tok_embeddings.weight.T)
    torch.testing.assert_close(model(tokens()), model.head(model.trunk(tokens())))


def test_final_softcap_bounds_logits(tiny) -> None:
    cap = 3.0
    raw = build(tiny(init_std=1.0))(tokens())
    capped = build(tiny(init_std=1.0, final_logit_softcap=cap))(tokens())
    assert raw.abs().max() > 3 * cap
    assert capped.abs().max() <= cap
    torch.testing.assert_close(capped, cap * torch.tanh(raw / cap))


def test_init(tiny) -> None:
    config = tiny(d_model=64, n_layer=8, bias=True, norm="layernorm", norm_position="sandwich", qk_norm=True,
                  position="learned", vocab_size=256)
    model = build(config)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith(("out_proj.weight", "down_proj.weight")):
            assert p.std().item() == pytest.approx(out_std, rel=0.15), name
        elif "norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # every other Linear and Embedding weight, the learned position table included
            assert p.std().item() == pytest.approx(std, rel=0.15), name
            assert abs(p.mean().item()) < 0.2 * std, name


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex"])
@pytest.mark.parametrize("position", POSITION_CHOICES)
def test_pure_bf16_keeps_bf16(tiny, eager_flex, packed, position: str, backend: str) -> None:
    """DeepSpeed bf16 runs the model in bf16 without autocast: nothing may promote q/k to fp32."""
    config = tiny(position=position, attention_backend=backend, qk_norm=True, attn_logit_softcap=None)
    model = build(config)
    grad = backend != "flex"  # flex has no CPU backward
    with torch.no_grad():
        reference = model(tokens(), *packed)
    model = model.to(torch.bfloat16)
    with torch.set_grad_enabled(grad):
        logits = model(tokens(), *packed)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)
    if grad:
        logits.float().square().mean().backward()
        assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_tiny_model_overfits_one_batch(tiny) -> None:
    model = build(tiny())
    x, y = tokens(2, 16, seed=3), tokens(2, 16, seed=4)
    losses = train(model, 200, 1e-2, x, y, stop_below=0.1)
    assert losses[-1] < 0.1, f"loss {losses[-1]:.3f} after {len(losses)} steps"


# ----------------------------------------------------------------- parity with Hugging Face (independent)


def copy_into_hf(model: Decoder, hf: torch.nn.Module) -> None:
    state = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.final_norm.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        names = {"self_attn.q_proj": block.attn.q_proj, "self_attn.k_proj": block.attn.k_proj,
                 "self_attn.v_proj": block.attn.v_proj, "self_attn.o_proj": block.attn.out_proj,
                 "mlp.gate_proj": block.ffn.gate_proj, "mlp.up_proj": block.ffn.up_proj,
                 "mlp.down_proj": block.ffn.down_proj, "input_layernorm": block.attn_norm,
                 "post_attention_layernorm": block.ffn_norm}
        if model.config.qk_norm:
            names |= {"self_attn.q_norm": block.attn.q_norm, "self_attn.k_norm": block.attn.k_norm}
        state |= {prefix + name + ".weight": module.weight for name, module in names.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in name for name in missing), (missing, unexpected)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_matches_hugging_face(tiny, family: str) -> None:
    """The Llama recipe (RMSNorm, SwiGLU, RoPE with restarting position_ids, GQA) equals LlamaForCausalLM;
    with qk_norm it equals Qwen3ForCausalLM (per-head RMSNorm of q and k before RoPE)."""
    transformers = pytest.importorskip("transformers")
    qk_norm = family == "qwen3"
    config = tiny(n_kv_head=2, rope_theta=500.0, norm_eps=1e-6, qk_norm=qk_norm, init_std=0.2)
    model = build(config)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=config.d_ff, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                  max_position_embeddings=32, tie_word_embeddings=False, attention_bias=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    if qk_norm:
        hf_config = transformers.Qwen3Config(**common)
        hf = transformers.Qwen3ForCausalLM(hf_config)
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(mlp_bias=False, **common))
    hf.config._attn_implementation = "eager"
    copy_into_hf(model, hf.eval())
    x = tokens()
    position_ids = torch.cat([torch.arange(7), torch.arange(9)]).repeat(2, 1)
    with torch.no_grad():
        ours = model(x, position_ids=position_ids)
        theirs = hf(input_ids=x, position_ids=position_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
