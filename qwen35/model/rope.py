"""Partial, interleaved-mRoPE rotary embedding of the full-attention layers.

Only the first `rotary_dim` (64 of 256) dims of each head rotate, NeoX style (dim d pairs with
d + rotary_dim/2). Each of the rotary_dim/2 frequency slots takes its position from one of three axes
(T, H, W) in the interleaved pattern T,H,W,T,H,W,...; for text all three equal the token position, so
text is plain 1-D RoPE. Angles are formed in fp32 exactly as the reference does (position * inv_freq),
which keeps logits identical at positions beyond 200K; cos/sin stay fp32 whatever the model dtype.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim/2] (fp32, CPU) and the cos/sin scale (1.0 except for yarn)."""
    dim = config.rotary_dim
    base = config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    pos_freqs = base**exponents
    inv_freq = 1.0 / pos_freqs
    if config.rope_type == "default":
        return inv_freq, 1.0
    # yarn (static): blend interpolated and extrapolated frequencies over a linear ramp of dims.
    factor = config.rope_factor
    original = config.rope_original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = config.rope_attention_factor
    if attention_factor is None:
        if config.rope_mscale and config.rope_mscale_all_dim:
            attention_factor = mscale(factor, config.rope_mscale) / mscale(factor, config.rope_mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq, float(attention_factor)


# A decode step (or a speculative verify pass: at most this many positions) looks its rows up in a table of
# the first TABLE_POSITIONS positions (rotary_dim x 8 bytes each: 4 MiB for the released models) instead of
# running the formula's ~8 small ops, ~0.3 ms a token once the weight stream has flushed the caches. The table
# holds the formula's own values: fp32 products of the same operands and the same cos/sin, so a position gets
# the same bits either way (tested).
LOOKUP_MAX_POSITIONS = 64
TABLE_POSITIONS = 8192


class RotaryEmbedding:
    """Computes (cos, sin) for given positions. Holds no state that depends on the sequence."""

    def __init__(self, config: ModelConfig):
        self.inv_freq, self.scale = rope_inv_freq(config)
        half = config.rotary_dim // 2
        # axis[i]: which of (T, H, W) frequency slot i reads its position from.
        axis = torch.zeros(half, dtype=torch.long, device="cpu")
        h_end = min(config.mrope_section[1] * 3, half) if len(config.mrope_section) > 1 else 0
        w_end = min(config.mrope_section[2] * 3, half) if len(config.mrope_section) > 2 else 0
        axis[1:h_end:3] = 1
        axis[2:w_end:3] = 2
        self.axis = axis
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None  # _table(): built on first lookup

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T], [B, T] (text) or [3, B, T] (T/H/W axes). Returns cos, sin: [B or 1, T, rotary_dim]."""
        if positions.dim() == 1:
            positions = positions[None]
        if positions.dim() == 2 and positions.numel() <= LOOKUP_MAX_POSITIONS:
            flat = positions.flatten().tolist()
            if 0 <= min(flat) and max(flat) < TABLE_POSITIONS:
                cos, sin = self._table(positions.device)
                return cos[positions], sin[positions]
        if positions.dim() == 2:
            freqs = positions[..., None].float() * self.inv_freq  # [B, T, half]
        elif positions.dim() == 3 and positions.shape[0] == 3:
            all_axes = positions[..., None].float() * self.inv_freq  # [3, B, T, half]
            idx = self.axis.view(1, 1, 1, -1).expand(1, *all_axes.shape[1:])
            freqs = all_axes.gather(0, idx)[0]
        else:
            raise ValueError(f"positions must be [T], [B, T] or [3, B, T], got shape {tuple(positions.shape)}")
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.scale, emb.sin() * self.scale

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [TABLE_POSITIONS, rotary_dim] of the first positions, computed by the formula above once."""
        if self._tables is None or self._tables[0].device != device:
            cos, sin = self(torch.arange(TABLE_POSITIONS, device=device)[None])  # [1, N]: the formula
            self._tables = cos[0], sin[0]
        return self._tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B or 1, T, R] with R <= D. Rotates the first R dims (in fp32)."""
    R = cos.shape[-1]
    rot, rest = x[..., :R].float(), x[..., R:]
    cos, sin = cos[:, None], sin[:, None]
    half = R // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = (rot * cos + rotated * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1)
