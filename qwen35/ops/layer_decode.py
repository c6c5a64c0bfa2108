"""The whole-layer decode kernels' side in Python: which calls they take, the arguments bind time builds for
them, and the bound forward of each decoder layer kind (ops/fast.bind_kernels binds them; decode_stack.py runs
every layer's kernel in one call with the same arguments).

A decoder layer whose pieces all fit runs its whole decode step as one C++ call, `decode_gdn_layer` or
`decode_attn_layer`, for up to LAYER_MAX_TOKENS tokens a row (a decode step, or a speculative verify pass whose
tokens are each computed as their own decode step would be). Anything else (more tokens, no cache, autograd,
packed-document masks) returns None and the layer runs its reference forward.
"""

from __future__ import annotations

import sys

import torch

LAYER_MAX_TOKENS = 8  # the whole-layer kernels' tokens per row (speculative verification; GEMV rows)


def layer_decoding(x: torch.Tensor, state, ctx) -> bool:
    """The calls the whole-layer kernels take: up to LAYER_MAX_TOKENS tokens per row (a decode step, or a
    speculative verify pass: each token computed exactly as its own decode step would), with a cache, no
    packed-document masks, no autograd."""
    return (x.shape[1] <= LAYER_MAX_TOKENS and state is not None and not torch.is_grad_enabled()
            and (ctx is None or ctx.segments is None) and x.shape[0] * x.shape[1] <= 64)


def rope_rows(rope):
    cos, sin = rope  # [B or 1, T, R] -> [B*T or T, R], rows in token order per row
    return cos.reshape(-1, cos.shape[-1]).contiguous(), sin.reshape(-1, sin.shape[-1]).contiguous()


def gdn_layer_args(layer, weights) -> tuple[tuple, tuple, tuple]:
    """decode_gdn_layer's arguments that stay the same from step to step, in its order around the three that
    change (the input, the conv state, the recurrent state): built once at bind time. Looked up through the
    modules each step they cost more than their count suggests: the weights stream through the caches every
    step, so each Python lookup misses them (0.8B int4: ~1 ms a token, 1.03x, in an alternating A/B)."""
    gdn = layer.linear_attn
    (w_in, k_in), (w_out, k_out), (w_gu, k_gu), (w_down, k_down) = weights  # packed at bind time (_packed)
    return ((layer.input_layernorm.weight, w_in, k_in),
            (gdn.conv1d.weight[:, 0].contiguous(), gdn.A_log, gdn.dt_bias),  # a view: training updates show
            (gdn.norm.weight, w_out, k_out, layer.post_attention_layernorm.weight, w_gu, k_gu, w_down, k_down,
             gdn.num_k_heads, layer.input_layernorm.eps))


def exclusive(state) -> bool:
    """Whether a decode step may update this Gated DeltaNet state's recurrent tensor in place: nothing but the
    state refers to it (a snapshot, kept per-token steps, a caller's variable, another cache built from it all
    add a reference; the kernel also checks that no view shares its memory). Otherwise the step writes a new
    tensor, as every step did before (in place measured 1.03x a token on the 0.8B int4, 1.01-1.04x int8)."""
    # two references while the check runs: the state's attribute and getrefcount's own argument
    return not state.keep_steps and sys.getrefcount(state.recurrent) == 2


def gdn_layer_decode(layer, x, state=None, ctx=None, portable: bool = False):
    """A whole Gated DeltaNet decoder layer's decode step in one C++ call (decode_gdn_layer, or
    portable_decode_gdn_layer on a CPU without AVX512); its matrices (bf16 or quantized, packed once at bind time)
    are in layer.layer_args."""
    if not layer_decoding(x, state, ctx):
        return None
    pre, mid, post = layer.layer_args
    B, T, H = x.shape
    in_place = T == 1 and exclusive(state)
    op = torch.ops.qwen35.portable_decode_gdn_layer if portable else torch.ops.qwen35.decode_gdn_layer
    out, convs, recs = op.default(
        x.reshape(B * T, H).contiguous(), *pre, state.conv.contiguous(), *mid, state.recurrent.contiguous(), *post,
        in_place)
    state.take(convs, recs)
    return out.view(B, T, H)


def kv_scales(state, bufs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The q8_0 scales of each row's keys and values (empty lists for a bf16 cache: the kernel's switch)."""
    if state.kv_cache == "q8_0":
        return [b.kd for b in bufs], [b.vd for b in bufs]
    return [], []


def attn_layer_args(layer, weights) -> tuple[tuple, tuple]:
    """decode_attn_layer's arguments that stay the same from step to step, before and after the ones that
    change (input, rotary rows, each row's buffers and length): built once at bind time (gdn_layer_args)."""
    attn = layer.self_attn
    (w_qkv, k_qkv), (w_o, k_o), (w_gu, k_gu), (w_down, k_down) = weights
    return ((layer.input_layernorm.weight, w_qkv, k_qkv, attn.q_norm.weight, attn.k_norm.weight),
            (w_o, k_o, layer.post_attention_layernorm.weight, w_gu, k_gu, w_down, k_down, attn.num_heads,
             layer.input_layernorm.eps))


def attn_layer_decode(layer, x, state=None, ctx=None, portable: bool = False):
    """A whole gated-attention decoder layer's decode step in one C++ call (decode_attn_layer, or
    portable_decode_attn_layer on a CPU without AVX512): the new key and value go straight into each row's buffer
    at its length (quantized on write for a q8_0 cache)."""
    if not layer_decoding(x, state, ctx):
        return None
    pre, post = layer.layer_args
    B, T, H = x.shape
    bufs = state.buffers(T)
    cos, sin = rope_rows(ctx.rope)
    op = torch.ops.qwen35.portable_decode_attn_layer if portable else torch.ops.qwen35.decode_attn_layer
    out = op.default(
        x.reshape(B * T, H).contiguous(), *pre, cos, sin, [b.k for b in bufs], [b.v for b in bufs],
        *kv_scales(state, bufs), [r.length for r in state.rows], *post)
    return out.view(B, T, H)


def portable_gdn_layer_decode(layer, x, state=None, ctx=None):
    return gdn_layer_decode(layer, x, state, ctx, portable=True)


def portable_attn_layer_decode(layer, x, state=None, ctx=None):
    return attn_layer_decode(layer, x, state, ctx, portable=True)
