"""The fast CPU paths, in one place: which modules may use the C++ kernels, decided once, and the kernels'
forms of the decode step.

The model files hold only the reference math. `bind_kernels(model, enabled)` (called by `load_model`,
and again whenever the model's weights move: `.to()`, fusing, unfusing) checks each module once, with the
kernels' own shape limits, and binds what fits:
- each bf16 `Linear` and fused projection gets a `GemvWeight` (the AVX512-BF16 GEMV for a few rows,
  torch's GEMM otherwise), the vocabulary projection too;
- a decoder layer whose pieces all fit gets its whole decode step as one C++ call (`decode_gdn_layer` /
  `decode_attn_layer`); otherwise its mixer alone may get its fused decode step;
- RMSNorm, the MLP's SiLU*up and the Gated DeltaNet conv+SiLU get their kernels.
A bound forward falls back to the module's reference forward whenever the call is not what the kernel
does (more than one token, no cache, autograd on), so binding never changes what a call means. What is not
a plain bf16 matrix (a quantized weight object) keeps its own matmul and, until a layer kernel knows its
format, runs the per-op path.

`kernel_policy` is the one rule for when binding is worth it, used by every command; QWEN35_KERNELS=1/0
overrides it.

(Past ~300 lines on purpose: the eligibility rules and the bound forms they guard are read together; a
fast path's shape limits live next to the code that relies on them.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import kernels
from .linear import Linear, linear, matrix

GEMV_MAX_ROWS = 8  # beyond this, torch's GEMM (compute-bound, oneDNN) wins
SMALL_MODEL_PARAMS = 50_000_000


def kernel_policy(model) -> bool:
    """Whether to bind the kernels for `model`: QWEN35_KERNELS=1 or 0 decides when set; otherwise yes for
    bf16 models of 50M parameters or more. (Below that, e.g. the bundled 10M model, the torch path is
    quick, and building the kernels on a fresh install, a one-time ~1 minute compile, costs more than they
    save.)"""
    env = os.environ.get("QWEN35_KERNELS")
    if env in ("0", "1"):
        return env == "1"
    n = sum(w.shape.numel() for _, w in model.named_weights())  # quantized matrices counted too
    return model.dtype == torch.bfloat16 and n >= SMALL_MODEL_PARAMS


class GemvWeight:
    """A bf16 matrix [N, K] multiplied by the AVX512-BF16 GEMV kernel when there are few rows (decode),
    by torch's GEMM otherwise."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.shape, self.dtype = weight.shape, weight.dtype

    def matmul(self, x2: torch.Tensor, out_fp32: bool) -> torch.Tensor:
        if x2.shape[0] <= GEMV_MAX_ROWS and x2.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            return torch.ops.qwen35.gemv_bf16(x2 if x2.stride(-1) == 1 else x2.contiguous(), self.weight, out_fp32)
        y = F.linear(x2.contiguous(), self.weight)
        return y.float() if out_fp32 else y


@dataclass
class KernelReport:
    """What `bind_kernels` bound (module counts by kind) and, when nothing, why."""

    enabled: bool
    reason: str = ""
    bound: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str) -> None:
        self.bound[kind] = self.bound.get(kind, 0) + 1


def _plain_bf16(w) -> bool:
    return isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.is_contiguous()


def _plain(w) -> bool:
    """A plain bf16 matrix, bare or already wrapped for the GEMV (what the whole-layer kernels read)."""
    return _plain_bf16(w) or isinstance(w, GemvWeight)


def _gemv(w):
    """The weight object for a plain bf16 matrix (kept as is otherwise: fp32, or a quantized object)."""
    return GemvWeight(w) if _plain_bf16(w) else w


def _override(module: torch.nn.Module, fast) -> None:
    """module.forward := fast(module, ...) where it applies (returns a result), the reference otherwise."""
    reference = type(module).forward

    def forward(*args, **kwargs):
        out = fast(module, *args, **kwargs)
        return reference(module, *args, **kwargs) if out is None else out

    forward.kernel = fast.__name__
    module.forward = forward


def unbind_kernels(model) -> None:
    """Back to the reference forms everywhere (what `bind_kernels(model, False)` does)."""
    from ..model.mlp import silu_mul
    from ..ops.causal_conv import causal_conv1d_silu

    model.head_runtime = None
    for m in model.modules():
        m.__dict__.pop("forward", None)
        if isinstance(m, Linear):
            m.runtime_weight = None
        for attr in ("_in_proj", "_qkv", "_gate_up"):
            w = getattr(m, attr, None)
            if isinstance(w, GemvWeight):
                setattr(m, attr, w.weight)
        for w in _weight_objects(m):
            w.kernels = False
        if hasattr(m, "silu_mul"):
            m.silu_mul = silu_mul
        if hasattr(m, "conv_silu"):
            m.conv_silu = causal_conv1d_silu


def _weight_objects(m):
    """The quantized weight objects module m holds directly (its own weight, its fused matrices)."""
    from ..quant.weight import QuantizedWeight
    from .linear import StackedWeight

    found = [m.__dict__.get("weight")] + [getattr(m, a, None) for a in ("_in_proj", "_qkv", "_gate_up")]
    out = []
    for w in found:
        for part in (w.parts if isinstance(w, StackedWeight) else [w]):
            if isinstance(part, QuantizedWeight):
                out.append(part)
    return out


def bind_kernels(model, enabled: bool | None = None, whole_layers: bool = True) -> KernelReport:
    """Bind the C++ kernels where they fit (enabled True), unbind them (False), or follow `kernel_policy`
    (None). whole_layers=False binds only the per-op kernels (to test them against the reference).
    Returns what was bound."""
    from ..model.attention import GatedAttention
    from ..model.decoder import DecoderLayer
    from ..model.deltanet import GatedDeltaNet
    from ..model.mlp import MLP
    from ..model.norm import RMSNorm

    unbind_kernels(model)
    want = kernel_policy(model) if enabled is None else bool(enabled)
    model.kernels = want
    if not want:
        return KernelReport(False, "off by choice (kernel_policy or enabled=False)")
    if not kernels.available():
        return KernelReport(False, kernels.unavailable_reason() or "kernels unavailable")
    if model.device.type != "cpu" or model.dtype not in (torch.bfloat16, torch.float32):
        return KernelReport(False, f"kernels run {model.device.type} {model.dtype} models: no")
    report = KernelReport(True)
    bf16 = model.dtype == torch.bfloat16
    if bf16:
        model.head_runtime = _gemv(model.head_weight)
    for m in model.modules():
        if isinstance(m, RMSNorm) and m.weight.dtype == torch.float32:
            _override(m, _rmsnorm)
            report.add("rmsnorm")
        for w in _weight_objects(m):  # quantized weights run the VNNI kernels whatever the model dtype
            w.kernels = True
            report.add(w.scheme)
        if not bf16:
            continue
        if isinstance(m, Linear) and _plain_bf16(m.weight):
            m.runtime_weight = GemvWeight(m.weight)
            report.add("gemv")
        for attr in ("_in_proj", "_qkv", "_gate_up"):
            w = getattr(m, attr, None)
            if isinstance(w, torch.Tensor):
                setattr(m, attr, _gemv(w))
        if isinstance(m, MLP) and m.gate_proj.weight.shape[0] % 16 == 0:
            m.silu_mul = _silu_mul
        if isinstance(m, GatedDeltaNet) and m.conv_dim % 16 == 0 and 2 <= m.kernel_size <= 8:
            m.conv_silu = _conv_silu
    if not bf16:
        return report
    for layer in model.modules():
        if not isinstance(layer, DecoderLayer):
            continue
        mixer = layer.mixer
        if isinstance(mixer, GatedDeltaNet) and _gdn_fits(mixer):
            norms = _fp32(layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if (whole_layers and norms and _mlp_fits(layer.mlp) and _plain(mixer._in_proj)
                    and _plain_bf16(mixer.out_proj.weight)):
                _override(layer, _gdn_layer_decode)
                report.add("gdn_layer")
            else:
                _override(mixer, _gdn_decode)
                report.add("gdn_step")
        elif isinstance(mixer, GatedAttention) and _attn_fits(mixer, model.config.rotary_dim):
            norms = _fp32(layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if (whole_layers and norms and _mlp_fits(layer.mlp) and mixer._qkv is not None
                    and _plain(mixer._qkv) and _plain_bf16(mixer.o_proj.weight)):
                _override(layer, _attn_layer_decode)
                report.add("attn_layer")
            else:
                _override(mixer, _attn_decode)
                report.add("attn_step")
    return report


# -- eligibility: the kernels' compiled-in shapes, checked once at bind time -------------------------

def _fp32(*ts) -> bool:
    return all(t.dtype == torch.float32 for t in ts)


def _gdn_fits(m) -> bool:
    """The fused Gated DeltaNet decode step: its input projection may be any weight object (linear())."""
    return (_fp32(m.A_log, m.dt_bias, m.norm.weight) and m._in_proj is not None and m.conv_dim % 16 == 0
            and m.head_v_dim in (64, 128, 256) and 2 <= m.kernel_size <= 8)


def _attn_fits(m, rotary_dim: int) -> bool:
    groups = m.num_heads // m.num_kv_heads
    return (_fp32(m.q_norm.weight, m.k_norm.weight) and m.head_dim % 32 == 0 and m.head_dim <= 512
            and groups in (1, 2, 4, 8) and rotary_dim % 2 == 0 and rotary_dim <= m.head_dim)


def _mlp_fits(mlp) -> bool:
    return (mlp._gate_up is not None and _plain(mlp._gate_up) and mlp.gate_proj.weight.shape[0] % 16 == 0
            and _plain_bf16(mlp.down_proj.weight))


def _decoding(x: torch.Tensor, state) -> bool:
    """The calls the decode kernels take: one token per row, with a cache, no autograd."""
    return x.shape[1] == 1 and state is not None and not torch.is_grad_enabled()


# -- the bound forms -------------------------------------------------------------------------------

def _rmsnorm(norm, x):
    if torch.is_grad_enabled() or x.dtype not in (torch.bfloat16, torch.float32):
        return None
    return torch.ops.qwen35.rmsnorm(x.contiguous(), norm.weight, norm.eps, True)


def _silu_mul(gate_up):
    if torch.is_grad_enabled() or gate_up.dtype != torch.bfloat16:
        from ..model.mlp import silu_mul

        return silu_mul(gate_up)
    return torch.ops.qwen35.silu_mul(gate_up)


def _conv_silu(x, weight, state=None, tap_mask=None):
    if tap_mask is not None or torch.is_grad_enabled() or x.dtype != torch.bfloat16:
        from .causal_conv import causal_conv1d_silu

        return causal_conv1d_silu(x, weight, state, tap_mask)
    B, _, C = x.shape
    prev = state if state is not None else x.new_zeros(B, weight.shape[-1] - 1, C)
    return torch.ops.qwen35.conv_silu(x.contiguous(), weight.contiguous(), prev.contiguous())


def _rope_rows(rope):
    cos, sin = rope  # [B or 1, 1, R]
    return cos.reshape(cos.shape[0], -1).contiguous(), sin.reshape(sin.shape[0], -1).contiguous()


def _gdn_decode(gdn, x, state=None, ctx=None, mode="auto"):
    """The Gated DeltaNet mixer's decode step: projections, then conv, gates, delta rule and gated norm in
    one C++ call (gdn_decode)."""
    if not _decoding(x, state):
        return None
    B = x.shape[0]
    proj = linear(x.reshape(B, -1), gdn._in_proj)
    out, state.conv, state.recurrent = torch.ops.qwen35.gdn_decode(
        proj, state.conv.contiguous(), gdn.conv1d.weight[:, 0].contiguous(), gdn.A_log, gdn.dt_bias,
        state.recurrent.contiguous(), gdn.norm.weight, gdn.num_k_heads, gdn.norm.eps)
    return gdn.out_proj(out.view(B, 1, gdn.value_dim))


def _attn_decode(attn, x, state=None, ctx=None):
    """The attention mixer's decode step: the reference projections, then each row's query against its
    own keys (flash-decoding over per-row buffers, attn_decode)."""
    if not _decoding(x, state):
        return None
    q, k, v, gate = attn.project(x, ctx.rope)
    B = q.shape[0]
    kv = state.update(k, v)  # views [1, Hkv, length + 1, D] of each row's buffer
    out = torch.ops.qwen35.attn_decode(q.reshape(B, attn.num_heads, attn.head_dim).contiguous(),
                                       [kb[0] for kb, _ in kv], [vb[0] for _, vb in kv],
                                       [kb.shape[2] for kb, _ in kv], attn.head_dim**-0.5)
    return attn.output(out.view(B, attn.num_heads, 1, attn.head_dim), gate)


def _gdn_layer_decode(layer, x, state=None, ctx=None):
    """A whole Gated DeltaNet decoder layer's decode step in one C++ call (decode_gdn_layer)."""
    if not _decoding(x, state):
        return None
    gdn, mlp = layer.linear_attn, layer.mlp
    B, _, H = x.shape
    out, state.conv, state.recurrent = torch.ops.qwen35.decode_gdn_layer(
        x.reshape(B, H), layer.input_layernorm.weight, matrix(gdn._in_proj), state.conv.contiguous(),
        gdn.conv1d.weight[:, 0].contiguous(), gdn.A_log, gdn.dt_bias, state.recurrent.contiguous(),
        gdn.norm.weight, matrix(gdn.out_proj.weight), layer.post_attention_layernorm.weight,
        matrix(mlp._gate_up), mlp.down_proj.weight, gdn.num_k_heads, layer.input_layernorm.eps)
    return out.view(B, 1, H)


def _attn_layer_decode(layer, x, state=None, ctx=None):
    """A whole gated-attention decoder layer's decode step in one C++ call (decode_attn_layer): the new key
    and value go straight into each row's buffer at its length."""
    if not _decoding(x, state):
        return None
    attn, mlp = layer.self_attn, layer.mlp
    B, _, H = x.shape
    bufs = state.buffers(1)
    cos, sin = _rope_rows(ctx.rope)
    out = torch.ops.qwen35.decode_attn_layer(
        x.reshape(B, H), layer.input_layernorm.weight, matrix(attn._qkv), attn.q_norm.weight, attn.k_norm.weight,
        cos, sin, [b.k for b in bufs], [b.v for b in bufs], [r.length for r in state.rows], attn.o_proj.weight,
        layer.post_attention_layernorm.weight, matrix(mlp._gate_up), mlp.down_proj.weight, attn.num_heads,
        layer.input_layernorm.eps)
    return out.view(B, 1, H)


__all__ = ["bind_kernels", "unbind_kernels", "kernel_policy", "GemvWeight", "KernelReport"]
