"""Causal depthwise convolution over time, with a caller-owned state of the last K-1 inputs.

Gated DeltaNet mixes each channel of q|k|v with its own K-tap filter over the current and K-1 previous
tokens. The state holds those previous *pre-convolution* inputs, so a prompt split anywhere gives the
same result as one call.
"""

from __future__ import annotations

import torch


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None, tap_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, T, C]; weight: [C, K]; state: [B, K-1, C] or None (zeros).

    Returns (y [B, T, C] in x's dtype, new state [B, K-1, C]): y_t = sum_j weight[:, j] * x_{t-K+1+j}.
    tap_mask [B, T, K] (optional, packed training): tap j of token t is used only where True, so a window
    never reaches into the previous document. No activation is applied. The input state is not modified.
    """
    B, T, C = x.shape
    K = weight.shape[-1]
    if state is None:
        state = x.new_zeros(B, K - 1, C)
    xp = torch.cat([state.to(x.dtype), x], dim=1)  # [B, T+K-1, C]
    # K shifted multiply-adds in fp32 (one rounding at the end, like a real conv kernel), vectorised
    # over channels, with no [B, C, T] transposes.
    xf, w = xp.float(), weight.float()
    taps = [xf[:, j : j + T] * w[:, j] for j in range(K)]
    if tap_mask is not None:
        taps = [t * tap_mask[..., j : j + 1] for j, t in enumerate(taps)]
    y = taps[0]
    for t in taps[1:]:
        y = y + t
    return y.to(x.dtype), xp[:, T:].clone() if K > 1 else xp[:, :0]


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None,
                       tap_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(causal_conv1d(...)): the reference form of what Gated DeltaNet applies to q|k|v (same
    arguments and results as `causal_conv1d`; y rounded to x's dtype before the SiLU, as the kernel does)."""
    y, new_state = causal_conv1d(x, weight, state, tap_mask)
    return torch.nn.functional.silu(y), new_state
