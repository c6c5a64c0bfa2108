"""The gated delta rule: the recurrence inside every Gated DeltaNet layer, in two equal forms.

Shape letters used across qwen35:
  B batch, T tokens, H value heads (Hv), Hk key heads, Dk key head dim, Dv value head dim,
  C chunk length, N number of chunks, S attention (key/value) length.

Per value head, with state S in R^{Dk x Dv} (fp32) and a_t = exp(g_t):
    S <- a_t * S;  S <- S + k_t (beta_t * (v_t - S^T k_t))^T;  o_t = S^T q_t

`recurrent_gated_delta_rule` runs that token by token (decode). `chunk_gated_delta_rule` computes the same
thing 64 tokens at a time with the WY/UT transform (prefill). `gated_delta_rule` is the one dispatcher.

Callers pass q and k already L2-normalised, q already scaled by Dk^-0.5, and key heads already repeated
to the value heads, so both forms see identical inputs.
"""

from __future__ import annotations

import torch

__all__ = ["recurrent_gated_delta_rule", "chunk_gated_delta_rule", "gated_delta_rule", "CHUNK_SIZE"]

CHUNK_SIZE = 64


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token reference form.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g (log decay, <= 0), beta: [B, T, H];
    state: [B, H, Dk, Dv] or None (zeros). Returns (o [B, T, H, Dv] fp32, new state [B, H, Dk, Dv] fp32).
    The input state is not modified.
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, Dk, Dv) if state is None else state.float()
    outs = []
    decay = g.exp()
    for t in range(T):
        # out of place throughout, so this reference also differentiates
        S = S * decay[:, t, :, None, None]
        k_t = k[:, t]  # [B, H, Dk]
        recalled = torch.einsum("bhkv,bhk->bhv", S, k_t)
        delta = (v[:, t] - recalled) * beta[:, t, :, None]
        S = S + k_t[..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, dim=1), S


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """seg[..., i, j] = sum_{j < m <= i} g[..., m] for j <= i, -inf above the diagonal.

    Summed directly rather than as cumsum_i - cumsum_j: with tiny decays the cumulative sums reach
    -1e5 and the difference of two such numbers loses every digit of a normal step's decay.
    """
    C = g.shape[-1]
    strict_lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    # x[..., m, j] = g_m where m > j: summing over m <= i gives the segment (j, i].
    x = g[..., :, None].expand(*g.shape, C).masked_fill(~strict_lower, 0.0)
    seg = x.cumsum(dim=-2)
    return seg.masked_fill(~strict_lower.logical_or(torch.eye(C, dtype=torch.bool, device=g.device)),
                           float("-inf"))


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY/UT) form; same arguments and results as `recurrent_gated_delta_rule`.

    Within a chunk, the delta-rule updates are folded into one unit-lower-triangular solve; chunks then
    pass the state along sequentially. Every exponent is a sum of log decays (<= 0), so nothing
    overflows however small the decay, and padding tokens (g = 0, beta = 0) leave the state unchanged.
    Differentiable end to end (the scan writes each chunk's output once into a fresh tensor).
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    N = (T + pad) // C

    def chunk_major(x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, *d] -> fp32 [N, B, H, C, *d] in one copy: chunk-major from the start, so the sequential
        scan below reads contiguous blocks with no re-copy of its six operands (those copies, and a second
        one of q, k and v, were a seventh of a 512-token prefill)."""
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        x = x.reshape(B, N, C, H, *x.shape[3:]).movedim(3, 1).movedim(2, 0)  # [N, B, H, C, *d]
        return x.to(torch.float32, memory_format=torch.contiguous_format)

    q, k, v, g, beta = (chunk_major(x) for x in (q, k, v, g, beta))

    seg = _segment_sums(g)  # [N, B, H, C, C], log decay from j to i
    decay_in = seg.exp()  # lower triangle incl. diagonal (= 1), zeros above
    from_start = g.cumsum(-1)  # log decay from chunk start through i
    to_end = seg[..., -1, :]  # log decay from j (exclusive) to chunk end
    chunk_total = from_start[..., -1]

    k_beta = k * beta[..., None]
    v_beta = v * beta[..., None]
    # (I + A) with A strictly lower: A_ij = beta_i (k_i . k_j) decay(j -> i). Only its strict lower triangle is
    # read (unitriangular: the diagonal counts as ones). Inverted once (C right-hand sides, as the reference's
    # forward substitution does) and applied to both right-hand sides by products: cheaper than solving for
    # their 2 x 128 columns, and closer to a float64 solve (1.4e-7 against 4.3e-7 relative, measured).
    A = (k_beta @ k.transpose(-1, -2)) * decay_in
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand_as(A)
    inv = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
    u = inv @ v_beta  # new values
    decay_from_start = from_start.exp()[..., None]
    w = inv @ (k_beta * decay_from_start)  # keys that read the incoming state

    attn = (q @ k.transpose(-1, -2)) * decay_in  # causal intra-chunk scores, diagonal included
    q_in = q * decay_from_start
    k_out = k * to_end.exp()[..., None]
    carry = chunk_total.exp()[..., None, None]

    # The scan, with B and H flattened into one batch so each step's products and their additions are single
    # baddbmm calls (sums fused into the products: a 512-token chunk's scan of 8 steps took ~17 elementwise
    # ops more than its 5 products).
    BH = B * H
    u, w, attn, q_in = (x.reshape(N, BH, C, -1) for x in (u, w, attn, q_in))
    k_out_t = k_out.reshape(N, BH, C, Dk).transpose(-1, -2)
    carry = carry.reshape(N, BH, 1, 1)
    S = (q.new_zeros(B, H, Dk, Dv) if state is None else state.float()).reshape(BH, Dk, Dv)
    out = q.new_empty(N, BH, C, Dv)
    # in place where nothing records the ops: products written into `out` (out=) are not differentiable, and
    # autocast's bf16 products don't go into fp32 slots
    in_place = not torch.is_grad_enabled() and not torch.is_autocast_enabled(q.device.type)
    for n in range(N):
        v_new = torch.baddbmm(u[n], w[n], S, alpha=-1)  # u - w S
        if in_place:  # each step's output into its slot, the state on its fresh decayed copy: two copies spared
            torch.bmm(q_in[n], S, out=out[n]).baddbmm_(attn[n], v_new)
            S = (S * carry[n]).baddbmm_(k_out_t[n], v_new)
        else:
            out[n] = torch.baddbmm(torch.bmm(q_in[n], S), attn[n], v_new)
            S = torch.baddbmm(S * carry[n], k_out_t[n], v_new)
    out = out.view(N, B, H, C, Dv).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, Dv)[:, :T]
    return out, S.view(B, H, Dk, Dv)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    mode: str = "auto",
    recurrent=recurrent_gated_delta_rule,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one dispatcher. mode: "auto" (recurrent for a few tokens, chunked otherwise),
    "recurrent" or "chunk". Shapes as in `recurrent_gated_delta_rule`. recurrent: the token-by-token form to run
    (ops/step_forms.delta_rule and portable_delta_rule pass the kernels')."""
    if mode == "auto":
        mode = "recurrent" if q.shape[1] <= 4 else "chunk"
    if mode == "recurrent":
        return recurrent(q, k, v, g, beta, state)
    if mode == "chunk":
        return chunk_gated_delta_rule(q, k, v, g, beta, state)
    raise ValueError(f"unknown gated delta rule mode {mode!r} (expected auto, recurrent or chunk)")
