"""Position encodings: RoPE's relative property and reference form, ALiBi slopes, sinusoid table, meta init."""

from __future__ import annotations

import math

import pytest
import torch

from llmtrain.model.config import ConfigError
from llmtrain.model import Decoder
from llmtrain.model.position import (RoPE, alibi_bias, alibi_slopes, apply_rope, build_position,
                                     sinusoidal_table)


def rotate(rope: RoPE, x: torch.Tensor, position: int) -> torch.Tensor:
    """x (hd,) rotated to `position` through the module's own tables."""
    ctx = rope.context(torch.tensor([[position]]), None)
    q, _ = ctx.rotate(x.view(1, 1, 1, -1), x.view(1, 1, 1, -1))
    return q.view(-1)


def test_rope_depends_only_on_position_difference(tiny) -> None:
    rope = build_position(tiny(max_seq_len=512, head_dim=16))
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    for m, n in [(3, 0), (10, 7), (100, 60)]:
        reference = rotate(rope, q, m) @ rotate(rope, k, n)
        for offset in (1, 17, 300):
            shifted = rotate(rope, q, m + offset) @ rotate(rope, k, n + offset)
            torch.testing.assert_close(shifted, reference, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(rotate(rope, q, m) @ rotate(rope, k, n + 1), reference)  # not trivially constant
    torch.testing.assert_close(rotate(rope, q, 123).norm(), q.norm())  # a rotation


def test_rope_matches_complex_rotation_reference() -> None:
    """Independent form: pair (x_i, x_{i+hd/2}) as the complex number x_i + i·x_{i+hd/2}, times e^{i·pos·θ_i}."""
    hd, theta, T = 8, 10000.0, 12
    torch.manual_seed(0)
    x = torch.randn(2, T, 3, hd, dtype=torch.float64)  # (B, T, H, hd)
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs  # (T, hd/2)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * torch.polar(torch.ones_like(angles), angles)[:, None]
    expected = torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(apply_rope(x, angles.cos()[None], angles.sin()[None]), expected)


def test_rope_keeps_activation_dtype(tiny) -> None:
    rope = build_position(tiny())  # fp32 tables
    q = torch.randn(1, 8, 4, 8, dtype=torch.bfloat16)  # (B, T, H, hd)
    q2, k2 = rope.context(torch.arange(8)[None], None).rotate(q, q)
    assert q2.dtype == k2.dtype == torch.bfloat16


def test_alibi_slopes_follow_press_et_al() -> None:
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...)
    expected_12 = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert alibi_slopes(12) == pytest.approx(expected_12)
    assert alibi_slopes(4) == pytest.approx([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])


def test_alibi_bias_is_minus_slope_times_distance() -> None:
    slopes = torch.tensor([0.5, 0.25])
    positions = torch.tensor([[0, 1, 2, 0, 1]])  # restarting positions of a packed row
    bias = alibi_bias(slopes, positions)
    assert bias.shape == (1, 2, 5, 5)
    assert bias[0, 0, 2, 0] == -1.0 and bias[0, 1, 2, 0] == -0.5 and bias[0, 0, 4, 3] == -0.5
    assert bias[0, 0, 3, 3] == 0.0


def test_sinusoidal_table_matches_vaswani() -> None:
    table = sinusoidal_table(10, 6)
    p, i = 7, 1
    assert table[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 6)))
    assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 6)))
    assert sinusoidal_table(10, 7).shape == (10, 7)


def test_sinusoids_are_added_at_the_token_embeddings_scale(tiny) -> None:
    # Unscaled sinusoids (RMS 0.71) drowned tokens embedded at init_std 0.02 (docs/ablations.md, position).
    config = tiny(position="sinusoidal", init_std=0.02)
    position = Decoder(config).position
    h = torch.zeros(1, config.max_seq_len, config.d_model)
    added = position.embed(h, torch.arange(config.max_seq_len)[None])
    rms = added.pow(2).mean().sqrt().item()
    assert rms == pytest.approx(0.02, rel=0.05)
    torch.testing.assert_close(added[0] / (0.02 * math.sqrt(2)), sinusoidal_table(config.max_seq_len, config.d_model).float())


def test_sinusoid_rms_and_scaled_embeddings_set_the_balance_of_table_and_tokens(tiny) -> None:
    def table_rms(config) -> float:
        position = Decoder(config).position
        h = torch.zeros(1, config.max_seq_len, config.d_model)
        return position.embed(h, torch.arange(config.max_seq_len)[None]).pow(2).mean().sqrt().item()

    # Vaswani et al.'s table (RMS 1/sqrt(2)); with scaled embeddings the default follows them to init_std·sqrt(d).
    assert table_rms(tiny(position="sinusoidal", sinusoid_rms=0.7071)) == pytest.approx(0.7071, rel=0.05)
    assert table_rms(tiny(position="sinusoidal", scale_embeddings=True)) == \
        pytest.approx(0.02 * math.sqrt(32), rel=0.05)
    with pytest.raises(ConfigError, match="sinusoid_rms.*applies to position 'sinusoidal'"):
        tiny(position="rope", sinusoid_rms=0.5)


def test_scaled_embeddings_enter_the_blocks_times_sqrt_d_model(tiny) -> None:
    torch.manual_seed(0)
    plain = Decoder(tiny())
    scaled = Decoder(tiny(scale_embeddings=True))
    scaled.load_state_dict(plain.state_dict())  # no new parameters: the same weights load
    seen, ids = {}, torch.randint(0, 64, (2, 8))
    for name, model in (("plain", plain), ("scaled", scaled)):
        model.blocks[0].register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
        model(ids)
    torch.testing.assert_close(seen["scaled"], seen["plain"] * math.sqrt(32))


@pytest.mark.parametrize("position", ["rope", "sinusoidal", "alibi", "learned"])
def test_meta_device_build_then_reset_rebuilds_tables(tiny, position: str) -> None:
    config = tiny(position=position)
    reference = Decoder(config)
    with torch.device("meta"):
        model = Decoder(config)
    model.to_empty(device="cpu")
    model.reset_parameters()
    for (name, buffer), (_, expected) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(buffer, expected, msg=name)
    x = torch.randint(0, 64, (2, 8))
    assert torch.isfinite(model(x)).all()
