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
does (more than one token, no cache, autograd on), so binding never changes what a call means. The
whole-layer kernels take each matrix as parts of known kinds (`_packed`: bf16, or a quantized layout in
quant/formats.KERNEL_CODES, which they multiply with the same GEMVs the weight objects use); a layer holding
anything else runs the per-op path, where every weight object keeps its own matmul.

`kernel_policy` is the one rule for when binding is worth it, used by every command; QWEN35_KERNELS=1/0
overrides it.

The whole-layer kernels' bound forms and the arguments bind time builds for them are in layer_decode.py, the
per-op bound forms (norm, SiLU*up, conv, the mixers' decode steps, the delta rule over a sequence) in
step_forms.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import kernels
from .attention import prompt_attention, prompt_attention_q8
from .gated_delta import gated_delta_rule
from .layer_decode import attn_layer_args, attn_layer_decode, gdn_layer_args, gdn_layer_decode
from .linear import Linear
from .step_forms import (
    _attn_decode,
    _conv_silu,
    _gdn_decode,
    _portable_conv_silu,
    _portable_gdn_decode,
    _portable_silu_mul,
    _rmsnorm,
    _silu_mul,
    delta_rule,
    portable_delta_rule,
    prefill_attention,
    prefill_attention_q8,
)

GEMV_MAX_ROWS = 8  # beyond this, torch's GEMM (compute-bound, oneDNN) wins
SMALL_MODEL_PARAMS = 50_000_000


def kernel_policy(model) -> bool:
    """Whether to bind the kernels for `model`: QWEN35_KERNELS=1 or 0 decides when set; otherwise yes for a
    model holding quantized weights, whatever its size, and for bf16 models of 50M parameters or more.
    (Below that, e.g. the bundled 10M model in bf16, the torch path is quick enough, and building the
    kernels on a fresh install, a one-time ~35 s compile, costs more than a short run saves. Quantized
    weights are another matter: their torch path is the reference the kernels are tested against, which
    dequantizes every matrix at every call: the bundled model in int4 decoded 20 tok/s on it against 1,495
    with the kernels, and 115 in bf16.)"""
    env = os.environ.get("QWEN35_KERNELS")
    if env in ("0", "1"):
        return env == "1"
    if quantized_weights(model):
        return True
    n = sum(w.shape.numel() for _, w in model.named_weights())
    return model.dtype == torch.bfloat16 and n >= SMALL_MODEL_PARAMS


class GemvWeight:
    """A bf16 matrix [N, K] multiplied by the AVX512-BF16 GEMV kernel when there are few rows (decode), by the
    AMX panel kernel (kernels/amx_panels.cpp, the matrix read in place) up to BF16_PANEL_MAX_ROWS rows where the
    CPU has AMX, by torch's GEMM otherwise."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.shape, self.dtype = weight.shape, weight.dtype
        self.panel_fits = weight.shape[1] % 32 == 0 and weight.is_contiguous()  # the panel kernel's layout

    def matmul(self, x2: torch.Tensor, out_fp32: bool) -> torch.Tensor:
        rows = x2.shape[0]
        if x2.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            if rows <= GEMV_MAX_ROWS:
                return torch.ops.qwen35.gemv_bf16(x2 if x2.stride(-1) == 1 else x2.contiguous(), self.weight, out_fp32)
            from ..quant.weight import BF16_PANEL_MAX_ROWS, panels  # here: not on the decode steps' GEMV path

            if self.panel_fits and rows <= BF16_PANEL_MAX_ROWS and panels():
                # rounded to bf16 as torch's bf16 GEMM rounds its result, fp32 asked for or not
                y = torch.ops.qwen35.gemm_panels(x2.contiguous(), self.weight, _NO_SCALES, 0, False)
                return y.float() if out_fp32 else y
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


_NO_SCALES = torch.empty(0)


def _packed(w, portable: bool = False) -> tuple[list[torch.Tensor], list[int]] | None:
    """w as the whole-layer kernels take a matrix: (data, scales) per part and each part's kind, parts
    stacked along N (a fused group stored differently per member); None where a part is something else
    (fp32, a layout the layer kernels don't run, a quantized weight without its kernels: the AVX512 ones, or
    with portable=True the portable ones, whose bf16 GEMV takes rows of a multiple of 8)."""
    from ..quant.formats import (
        KERNEL_CODES,  # the quantized layouts the whole-layer kernels run, 0 being bf16
    )
    from ..quant.weight import QuantizedWeight
    from .linear import StackedWeight

    data, kinds = [], []
    for p in (w.parts if isinstance(w, StackedWeight) else [w]):
        p = p.weight if isinstance(p, GemvWeight) else p
        if _plain_bf16(p) and not (portable and p.shape[1] % 8):
            data += [p, _NO_SCALES]
            kinds.append(0)
        elif (isinstance(p, QuantizedWeight) and (p.portable if portable else p.kernels) and p.scheme in KERNEL_CODES
              and p.qs.is_contiguous() and p.d.is_contiguous()):
            data += [p.qs, p.d]
            kinds.append(KERNEL_CODES[p.scheme])
        else:
            return None
    return data, kinds


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
    model.decode_stack = None
    for m in model.modules():
        m.__dict__.pop("forward", None)
        m.__dict__.pop("layer_args", None)
        if isinstance(m, Linear):
            m.runtime_weight = None
        for attr in ("_in_proj", "_qkv", "_gate_up"):
            w = getattr(m, attr, None)
            if isinstance(w, GemvWeight):
                setattr(m, attr, w.weight)
        for w in weight_objects(m):
            w.kernels = w.portable = False
        if hasattr(m, "silu_mul"):
            m.silu_mul = silu_mul
        if hasattr(m, "conv_silu"):
            m.conv_silu = causal_conv1d_silu
        if hasattr(m, "delta_rule"):
            m.delta_rule = gated_delta_rule
        if hasattr(m, "prompt_attention"):
            m.prompt_attention = prompt_attention
            m.prompt_attention_q8 = prompt_attention_q8


def weight_objects(m):
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


def quantized_weights(model) -> list:
    """Every quantized weight object in `model`, module by module (weight_objects of each)."""
    return [w for m in model.modules() for w in weight_objects(m)]


def bind_kernels(model, enabled: bool | None = None, whole_layers: bool = True, quantized: bool = True) -> KernelReport:
    """Bind the C++ kernels where they fit (enabled True), unbind them (False), or follow `kernel_policy`
    (None). whole_layers=False binds only the per-op kernels, quantized=False leaves quantized weights on
    their reference matmul (layers holding them then run per op): both to test kernels against the
    reference. Returns what was bound."""
    from ..model.attention import GatedAttention
    from ..model.deltanet import GatedDeltaNet
    from ..model.mlp import MLP
    from ..model.norm import RMSNorm

    if enabled is not None and not isinstance(enabled, bool):  # kernels="off" is truthy: not what was meant
        raise ValueError(f"kernels must be True, False or None (automatic), got {enabled!r}")
    unbind_kernels(model)
    want = kernel_policy(model) if enabled is None else enabled
    model.kernels = want
    if not want:
        return KernelReport(False, "off by choice (kernel_policy or enabled=False)")
    if not kernels.available():
        why = kernels.unavailable_reason() or "kernels unavailable"
        # quantized matrices still get the portable kernels (kernels/portable_kernels.cpp, any CPU with a C++
        # compiler): their torch path is the reference, which dequantizes each whole matrix at every call
        # and so does the delta rule's decode step, whose torch form makes eight passes over the state a token
        objects = quantized_weights(model) if quantized else []
        mixers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)] if model.device.type == "cpu" else []
        if (objects or mixers) and kernels.portable_available():
            on = ("quantized weights on " if objects else "") + "the portable kernels"
            report = KernelReport(False, f"{why}; {on}")
            for w in objects:
                w.portable = True
                report.add("portable_" + w.scheme)
            for m in mixers:
                m.delta_rule = portable_delta_rule  # verification passes (several tokens a row) run it
                report.add("portable_delta_rule")
                if _portable_gdn_fits(m) and model.dtype == torch.bfloat16:
                    _override(m, _portable_gdn_decode)  # the whole decode step after the projection
                    report.add("portable_gdn_step")
                if model.dtype == torch.bfloat16 and m.conv_dim % 8 == 0 and 2 <= m.kernel_size <= 8:
                    m.conv_silu = _portable_conv_silu  # prefill's conv + SiLU over a chunk
                    report.add("portable_conv_silu")
            if model.dtype == torch.bfloat16 and model.device.type == "cpu":
                for m in model.modules():
                    if isinstance(m, MLP):
                        m.silu_mul = _portable_silu_mul  # prefill's (and per-op decode's) silu(gate) * up
                        report.add("portable_silu_mul")
                _bind_layers(model, report, whole_layers, portable=True)
            return report
        return KernelReport(False, why)
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
        if isinstance(m, GatedDeltaNet):  # prefill and verification passes: fp32 whatever the model dtype
            m.delta_rule = delta_rule
            report.add("delta_rule")
        if isinstance(m, GatedAttention) and bf16 and _prefill_attn_fits(m):
            m.prompt_attention, m.prompt_attention_q8 = prefill_attention, prefill_attention_q8
            report.add("prefill_attn")
        for w in weight_objects(m):  # quantized weights run the VNNI kernels whatever the model dtype
            w.kernels = quantized
            if quantized:
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
    if bf16:
        _bind_layers(model, report, whole_layers, portable=False)
    return report


def _bind_layers(model, report: KernelReport, whole_layers: bool, portable: bool) -> None:
    """Every decoder layer whose pieces fit runs its decode step as one C++ call of the library
    (decode_gdn_layer / decode_attn_layer, the MTP head's layer too; portable_decode_*_layer where the AVX512 one
    cannot load, kernels/portable_layers.cpp), and the decoder's stack as one call when all its layers do.
    whole_layers=False, or a layer that does not fit, leaves the mixer's own step: the AVX512 library's
    gdn_decode / attn_decode bound here, the portable Gated DeltaNet step bound by the caller (the portable
    attention has no per-op form)."""
    from ..model.attention import GatedAttention
    from ..model.decoder import DecoderLayer
    from ..model.deltanet import GatedDeltaNet
    from .layer_decode import portable_attn_layer_decode, portable_gdn_layer_decode

    if portable:
        prefix, gdn_fits, attn_fits = "portable_", _portable_gdn_fits, _portable_attn_fits
        gdn_layer, attn_layer, gdn_step, attn_step = portable_gdn_layer_decode, portable_attn_layer_decode, None, None
    else:
        prefix, gdn_fits, attn_fits = "", _gdn_fits, _attn_fits
        gdn_layer, attn_layer, gdn_step, attn_step = gdn_layer_decode, attn_layer_decode, _gdn_decode, _attn_decode
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]  # the MTP head's layer among them
    for layer in layers:
        mixer = layer.mixer
        norms = _fp32(layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        # LoRA adapters (train/lora.py) live in their projections' forward, which a whole-layer kernel never
        # calls: a layer holding one runs per op (the mixer kernels call out_proj / o_proj as modules)
        adapted = any(hasattr(mod, "lora_A") for mod in layer.modules())
        mlp = _mlp_weights(layer.mlp, portable) if whole_layers and norms and not adapted else None
        if isinstance(mixer, GatedDeltaNet) and gdn_fits(mixer):
            mats = mlp and [_packed(mixer._in_proj, portable), _packed(mixer.out_proj.weight, portable)]
            layer_form, args, step, kind = gdn_layer, gdn_layer_args, gdn_step, "gdn"
        elif isinstance(mixer, GatedAttention) and attn_fits(mixer, model.config.rotary_dim):
            mats = mlp and mixer._qkv is not None and [_packed(mixer._qkv, portable),
                                                       _packed(mixer.o_proj.weight, portable)]
            layer_form, args, step, kind = attn_layer, attn_layer_args, attn_step, "attn"
        else:
            continue
        if mats and all(mats):
            layer.layer_args = args(layer, (*mats, *mlp))
            _override(layer, layer_form)
            report.add(f"{prefix}{kind}_layer")
        elif step is not None:
            _override(mixer, step)
            report.add(f"{kind}_step")
    if all("layer_args" in layer.__dict__ for layer in model.model.layers):
        from .decode_stack import DecodeStack

        model.decode_stack = DecodeStack(model, portable)  # the layer loop of a decode step in one call
        report.add(prefix + "decode_stack")


# -- eligibility: the kernels' compiled-in shapes, checked once at bind time -------------------------

def _fp32(*ts) -> bool:
    return all(t.dtype == torch.float32 for t in ts)


def _gdn_fits(m) -> bool:
    """The fused Gated DeltaNet decode step: its input projection may be any weight object (linear())."""
    return (_fp32(m.A_log, m.dt_bias, m.norm.weight) and m._in_proj is not None and m.conv_dim % 16 == 0
            and m.head_v_dim in (64, 128, 256) and 2 <= m.kernel_size <= 8)


def _portable_gdn_fits(m) -> bool:
    """portable_gdn_decode: any head sizes, a conv of 2+ taps, the fused projection, fp32 gate parameters."""
    return _fp32(m.A_log, m.dt_bias, m.norm.weight) and m._in_proj is not None and m.kernel_size >= 2


def _portable_attn_fits(m, rotary_dim: int) -> bool:
    """portable_decode_attn_layer: any grouping, head sizes the 8-lane loops take, fp32 q/k norms."""
    return (_fp32(m.q_norm.weight, m.k_norm.weight) and m.head_dim % 8 == 0 and m.num_heads % m.num_kv_heads == 0
            and rotary_dim % 2 == 0 and rotary_dim <= m.head_dim)


def _prefill_attn_fits(m) -> bool:
    """prefill_attn: head dims its pairs of 16 lanes take; not where oneDNN / MKL have AMX tiles, whose bf16
    products torch's flash attention then runs natively (this kernel's vdpbf16ps is AVX512-BF16 only: not
    measured against that there)."""
    from ..quant.weight import prefill_gemm_machine

    return m.head_dim % 32 == 0 and m.head_dim <= 512 and prefill_gemm_machine() != "amx"


def _attn_fits(m, rotary_dim: int) -> bool:
    groups = m.num_heads // m.num_kv_heads
    return (_fp32(m.q_norm.weight, m.k_norm.weight) and m.head_dim % 32 == 0 and m.head_dim <= 512
            and groups in (1, 2, 4, 8) and rotary_dim % 2 == 0 and rotary_dim <= m.head_dim)


def _mlp_weights(mlp, portable: bool = False):
    """The MLP's (gate|up, down) as the layer kernels take them, or None where they can't."""
    if mlp._gate_up is None or mlp.gate_proj.weight.shape[0] % 16:
        return None
    mats = _packed(mlp._gate_up, portable), _packed(mlp.down_proj.weight, portable)
    return mats if all(mats) else None


__all__ = ["GemvWeight", "KernelReport", "bind_kernels", "kernel_policy", "quantized_weights", "unbind_kernels"]
