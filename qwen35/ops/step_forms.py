"""The per-op bound forms that ops/fast.bind_kernels puts on modules (module.forward or a module's function
attribute): RMSNorm, the MLP's SiLU*up, the Gated DeltaNet conv + SiLU and delta rule, the attention of a prompt
chunk, and the two mixers' decode steps. Each returns None (or the reference's result) for a call its kernel does
not take, so binding never changes what a call means; the whole-layer forms are in layer_decode.py."""

from __future__ import annotations

import torch

from .attention import prompt_attention, prompt_attention_q8
from .gated_delta import gated_delta_rule, recurrent_gated_delta_rule
from .linear import linear


def _decoding(x: torch.Tensor, state) -> bool:
    """The calls the decode kernels take: one token per row, with a cache, no autograd; or a speculative verify
    (the cache's keep_steps), whose every token must be computed as its own decode step would compute it (the
    reference forward of several tokens rounds otherwise: greedy drafting then changed tokens)."""
    return state is not None and (x.shape[1] == 1 or state.keep_steps) and not torch.is_grad_enabled()


def _rmsnorm(norm, x):
    if torch.is_grad_enabled() or x.dtype not in (torch.bfloat16, torch.float32):
        return None
    return torch.ops.qwen35.rmsnorm(x.contiguous(), norm.weight, norm.eps, True)


def _silu_mul(gate_up, op: str = "silu_mul"):
    """The MLP's silu(gate) * up: silu_mul, or portable_silu_mul where the AVX512 library cannot load."""
    if torch.is_grad_enabled() or gate_up.dtype != torch.bfloat16:
        from ..model.mlp import silu_mul

        return silu_mul(gate_up)
    return getattr(torch.ops.qwen35, op)(gate_up.contiguous())


def _portable_silu_mul(gate_up):
    return _silu_mul(gate_up, op="portable_silu_mul")


def _conv_silu(x, weight, state=None, tap_mask=None, op: str = "conv_silu"):
    """The Gated DeltaNet's causal conv + SiLU over a chunk: conv_silu, or portable_conv_silu where the AVX512
    library cannot load."""
    if tap_mask is not None or torch.is_grad_enabled() or x.dtype != torch.bfloat16:
        from .causal_conv import causal_conv1d_silu

        return causal_conv1d_silu(x, weight, state, tap_mask)
    B, _, C = x.shape
    prev = state if state is not None else x.new_zeros(B, weight.shape[-1] - 1, C)
    x = x if x.stride(-1) == 1 else x.contiguous()  # a column slice of the fused projection is read in place
    return getattr(torch.ops.qwen35, op)(x, weight.contiguous(), prev.contiguous())


def _portable_conv_silu(x, weight, state=None, tap_mask=None):
    return _conv_silu(x, weight, state, tap_mask, op="portable_conv_silu")


def _gdn_decode(gdn, x, state=None, ctx=None, mode="auto", op: str = "gdn_decode"):
    """The Gated DeltaNet mixer's decode step: projections, then conv, gates, delta rule and gated norm in
    one C++ call (gdn_decode, or portable_gdn_decode where the AVX512 library cannot load)."""
    if not _decoding(x, state):
        return None
    B, T, _ = x.shape
    proj = linear(x.reshape(B * T, -1), gdn._in_proj).view(B, T, -1)
    conv, recurrent, outs, convs, recs = state.conv, state.recurrent, [], [], []
    for t in range(T):  # (T > 1: a speculative verify, token by token, the state after each kept for its rewind)
        out, conv, recurrent = getattr(torch.ops.qwen35, op)(
            proj[:, t].contiguous(), conv.contiguous(), gdn.conv1d.weight[:, 0].contiguous(), gdn.A_log, gdn.dt_bias,
            recurrent.contiguous(), gdn.norm.weight, gdn.num_k_heads, gdn.norm.eps)
        outs.append(out)
        convs.append(conv)
        recs.append(recurrent)
    state.take(convs, recs)
    return gdn.out_proj(torch.stack(outs, dim=1))


def _portable_gdn_decode(gdn, x, state=None, ctx=None, mode="auto"):
    return _gdn_decode(gdn, x, state, ctx, mode, op="portable_gdn_decode")


def _attn_decode(attn, x, state=None, ctx=None):
    """The attention mixer's decode step: the reference projections, then each row's query against its
    own keys (flash-decoding over per-row buffers, attn_decode). A speculative verify (state.keep_steps) of T
    tokens too, each token a row of its own over its row's first length + t + 1 keys: its decode step."""
    if not _decoding(x, state):
        return None
    q, k, v, gate = attn.project(x, ctx.rope)
    B, _, T, D = q.shape
    bufs = [b for b in state.append(k, v) for _ in range(T)]  # each row's buffer, holding length + T tokens now
    lengths = [r.length + t + 1 for r in state.rows for t in range(T)]
    q = q.transpose(1, 2).reshape(B * T, attn.num_heads, D).contiguous()
    if state.kv_cache == "q8_0":  # the int8 blocks and their scales, read in place
        out = torch.ops.qwen35.attn_decode_q8(q, [b.k for b in bufs], [b.kd for b in bufs],
                                              [b.v for b in bufs], [b.vd for b in bufs], lengths, D**-0.5)
    else:
        out = torch.ops.qwen35.attn_decode(q, [b.k for b in bufs], [b.v for b in bufs], lengths, D**-0.5)
    return attn.output(out.view(B, T, attn.num_heads, D).transpose(1, 2), gate)


def _differentiates(*tensors) -> bool:
    """Whether autograd would record an operation on these tensors (the kernels have no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_recurrent(op: str):
    """recurrent_gated_delta_rule on the kernel torch.ops.qwen35.<op> (kernels/delta_rule.h: blocks of tokens,
    two passes over the state a block where the torch form makes eight a token); where autograd records, the
    torch form."""

    def recurrent(q, k, v, g, beta, state=None):
        if _differentiates(q, k, v, g, beta, state):
            return recurrent_gated_delta_rule(q, k, v, g, beta, state)
        if state is None:
            B, _, H, Dk = k.shape
            state = torch.zeros(B, H, Dk, v.shape[-1])
        return getattr(torch.ops.qwen35, op)(q, k, v, g, beta, state)

    return recurrent


_portable_recurrent = _kernel_recurrent("portable_delta_rule")
_avx512_recurrent = _kernel_recurrent("delta_rule")


def _kernel_delta_rule(recurrent, q, k, v, g, beta, state, mode):
    if mode == "auto" and not _differentiates(q, k, v, g, beta, state):
        mode = "recurrent"
    return gated_delta_rule(q, k, v, g, beta, state, mode=mode, recurrent=recurrent)


def delta_rule(q, k, v, g, beta, state=None, mode: str = "auto"):
    """ops/gated_delta.gated_delta_rule with its recurrent form on the kernel (kernels/delta_rule.h, the AVX512
    library's build), which "auto" then takes for any number of tokens where autograd does not record: it
    measured faster than the chunked torch form at every length, 3-4x from 128 tokens on (one 0.8B layer, 16
    heads of 128, 2 threads, Zen 4: 16 tokens 0.20 against 2.6 ms, 512 tokens 5.7 against 24.5, 2,048 tokens
    22.9 against 87). Where autograd records (training) "auto" is the dispatcher's own choice: the chunked form,
    the torch recurrence for up to 4 tokens; mode="chunk" forces the chunked form."""
    return _kernel_delta_rule(_avx512_recurrent, q, k, v, g, beta, state, mode)


def portable_delta_rule(q, k, v, g, beta, state=None, mode: str = "auto"):
    """delta_rule on the portable library's build of the same kernel (machines without AVX512: held to AVX2 on
    a Zen 4, one 0.8B layer, 512 tokens 6.1 against the chunked torch form's 22.0 ms)."""
    return _kernel_delta_rule(_portable_recurrent, q, k, v, g, beta, state, mode)


def prefill_attention(q, k, v, past: int, scale: float):
    """GatedAttention.prompt_attention on torch.ops.qwen35.prefill_attn (kernels/prefill_attn.cpp: AVX512-BF16
    dot products, where torch's flash attention runs MKL's bf16 products as fp32 SGEMMs); the reference form
    where autograd records or the tensors are not bf16."""
    if _differentiates(q, k, v) or not q.dtype == k.dtype == v.dtype == torch.bfloat16:
        return prompt_attention(q, k, v, past, scale)
    return torch.ops.qwen35.prefill_attn(q[0].contiguous(), k[0], v[0], past, scale)[None]


def prefill_attention_q8(q, buf, past: int, scale: float):
    """GatedAttention.prompt_attention_q8 on torch.ops.qwen35.prefill_attn_q8: prefill_attn over a row's q8_0
    buffer read in place, each block of keys dequantized as the kernel packs it (bit for bit prefill_attn over
    the dequantized prefix, with no such prefix made); the reference form where autograd records or q is not
    bf16."""
    if _differentiates(q) or q.dtype != torch.bfloat16:
        return prompt_attention_q8(q, buf, past, scale)
    S = past + q.shape[2]
    return torch.ops.qwen35.prefill_attn_q8(q[0].contiguous(), buf.k[:, :S], buf.kd[:, :S], buf.v[:, :S],
                                            buf.vd[:, :S], past, scale)[None]
