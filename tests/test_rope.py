"""Rotary tables: a decode step looks its (cos, sin) rows up in a table of the first positions
(model/rope.py); the table must hold exactly what the formula computes for those positions, so a token gets
the same rotation whether it arrives in a prompt chunk (formula) or a decode step (table)."""

import pytest
import torch

from qwen35.config import ModelConfig
from qwen35.model import rope
from qwen35.shapes import text_config

CONFIGS = {
    "0.8b": text_config("0.8b"),  # rotary_dim 64
    "yarn": text_config("tiny", rope_parameters=dict(rope_type="yarn", rope_theta=1e7, partial_rotary_factor=0.5,
                                                     mrope_section=[3, 3, 2], factor=4.0,
                                                     original_max_position_embeddings=4096)),
    "odd": text_config("tiny", head_dim=40, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                 partial_rotary_factor=0.5)),  # 20: vector tails
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_table_rows_are_the_formulas_bits(name):
    rot = rope.RotaryEmbedding(ModelConfig.from_hf(CONFIGS[name]))
    gen = torch.Generator().manual_seed(0)
    for B, T in ((1, 1), (3, 1), (2, 4), (1, rope.LOOKUP_MAX_POSITIONS)):
        pos = torch.randint(0, rope.TABLE_POSITIONS, (B, T), generator=gen)
        pos[0, 0] = rope.TABLE_POSITIONS - 1
        looked_up = rot(pos)
        # the same positions among more than LOOKUP_MAX_POSITIONS: computed by the formula
        wide = torch.cat([pos, torch.zeros(B, rope.LOOKUP_MAX_POSITIONS, dtype=pos.dtype)], 1)
        computed = [t[:, :T] for t in rot(wide)]
        assert all(torch.equal(a, b) for a, b in zip(looked_up, computed)), (name, B, T)
        assert looked_up[0].shape == (B, T, rot.inv_freq.shape[0] * 2)


def test_positions_outside_the_table_use_the_formula():
    rot = rope.RotaryEmbedding(ModelConfig.from_hf(CONFIGS["0.8b"]))
    pos = torch.tensor([[rope.TABLE_POSITIONS, 200_000]])
    cos, sin = rot(pos)
    freqs = (pos[..., None].float() * rot.inv_freq).double()  # the fp32 angles the formula rotates by
    assert torch.allclose(cos.double(), torch.cat([freqs, freqs], -1).cos() * rot.scale, atol=1e-6)
    assert torch.allclose(sin.double(), torch.cat([freqs, freqs], -1).sin() * rot.scale, atol=1e-6)
    assert rot._tables is None  # never built for them
