"""RotaryEmbedding's per-position tables: a step's lookup gives [cos, cos] and [-sin, sin] of
position * inv_freq, the values the step used to build from the half tables itself."""

from __future__ import annotations

import torch

from tokenmill.model.layers import RotaryEmbedding, apply_rope, rope_inv_freq


def test_a_lookup_gives_the_concatenated_tables_bit_for_bit():
    rope = RotaryEmbedding(64, 10000.0, None, 512)
    positions = torch.tensor([0, 1, 7, 300, 511])
    cos, sin = rope(positions)
    assert cos.shape == sin.shape == (5, 1, 64)
    freqs = torch.arange(512, dtype=torch.float32)[:, None] * rope_inv_freq(64, 10000.0, None)[None, :]
    half_cos, half_sin = freqs.cos()[positions], freqs.sin()[positions]
    assert torch.equal(cos[:, 0], torch.cat((half_cos, half_cos), -1))
    assert torch.equal(sin[:, 0], torch.cat((-half_sin, half_sin), -1))


def test_rotating_by_the_tables_is_rotate_half_rope():
    rope = RotaryEmbedding(8, 10000.0, None, 64)
    x = torch.randn(3, 2, 8)
    positions = torch.tensor([5, 17, 63])
    cos, sin = rope(positions)
    angle = positions[:, None].float() * rope_inv_freq(8, 10000.0, None)[None, :]  # [3, 4]
    x1, x2 = x[..., :4], x[..., 4:]
    c, s = angle.cos()[:, None], angle.sin()[:, None]
    expected = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=1e-6, atol=1e-6)
