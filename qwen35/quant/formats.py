"""Block-quantized weight layouts, their reference quantize / dequantize, and their names.

Both layouts are GGUF's, value for value, so a GGUF file's Q8_0 / Q4_0 tensors run as they are and ours
export without requantizing. Along the input dimension K, every block of 32 weights has one fp16 scale d:
- q8_0: qs int8 [N, K]; w = d * q. 8.5 bits per weight.
- q4_0: qs uint8 [N, K/2]; in each block's 16 bytes, byte j holds element j in its low nibble and element
  j+16 in its high one; w = d * (q - 8). 4.5 bits per weight.
Unlike GGUF, which interleaves d with each block's bytes, the scales live in their own array d fp16
[N, K/32] beside qs: the kernels then read two aligned streams. Quantization follows ggml's reference
(quantize_row_q8_0_ref / quantize_row_q4_0_ref) exactly: the same rounding, the same choice of scale.

Two more are GGUF's K-quants, on super-blocks of 256 (quant/kquants.py): q4_k (4.5 bits per weight: 6-bit
scales and mins per 32) and q6_k (6.5625: int8 scales per 16), stored as GGUF's block bytes verbatim in qs,
with an empty d [N, 0]. A matrix whose K is not a multiple of its layout's block never gets that layout.

Scheme names are GGUF's type names; `int8` and `int4` are aliases of the recommended 8-bit and 4-bit
*policies* (quant/policy.py), never of a layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import Qwen35Error
from . import kquants

BLOCK = 32


class QuantError(Qwen35Error, ValueError):
    """A quantization scheme or quantized tensor we cannot use; the message names it."""


@dataclass(frozen=True)
class Layout:
    name: str
    bits_per_weight: float
    block_bytes: int  # bytes of qs per block of `block` weights
    block: int = BLOCK  # weights per block along K
    d_per_block: int = 1  # fp16 scales in d per block (0: the scales live inside qs's blocks)

    def fits(self, K: int) -> bool:
        return K % self.block == 0

    def qs_shape(self, N: int, K: int) -> tuple[int, int]:
        return (N, K // self.block * self.block_bytes)

    def d_shape(self, N: int, K: int) -> tuple[int, int]:
        return (N, K // self.block * self.d_per_block)

    @property
    def qs_cols(self) -> int:
        return self.block_bytes

    @property
    def qs_dtype(self) -> torch.dtype:
        return torch.int8 if self.name == "q8_0" else torch.uint8


LAYOUTS = {"q8_0": Layout("q8_0", 8.5, 32), "q4_0": Layout("q4_0", 4.5, 16),
           "q4_k": Layout("q4_k", 4.5, kquants.Q4K_BYTES, kquants.QK, 0),
           "q6_k": Layout("q6_k", 6.5625, kquants.Q6K_BYTES, kquants.QK, 0)}
# The code each C++ kernel takes for a layout (gemm_quant, gemm_panels, the whole-layer kernels, the portable
# kernels; 0 is a bf16 matrix there), and the K-quants' among them (quant_k_kernels.cpp)
KERNEL_CODES = {"q8_0": 1, "q4_0": 2, "q4_k": 3, "q6_k": 4}
K_KIND = {s: KERNEL_CODES[s] for s in ("q4_k", "q6_k")}


def layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise QuantError(f"unknown quantized layout {name!r} (known: {', '.join(LAYOUTS)})") from None


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _blocks(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    if K % BLOCK:
        raise QuantError(f"cannot block-quantize a [{N}, {K}] matrix: K must be a multiple of {BLOCK}")
    return w.float().reshape(N, K // BLOCK, BLOCK)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d is 0 (an all-zero block), as ggml computes `id`."""
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)


def _int8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., blocks, 32] fp32 -> (int8 values, fp32 scale max|x| / 127 per block): q8_0's rule, also what
    the kernels apply to their input rows."""
    d = x.abs().amax(-1) / 127
    return _round_away(x * _inverse(d)[..., None]).clamp(-127, 127).to(torch.int8), d


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (qs int8 [N, K], d fp16 [N, K/32])."""
    qs, d = _int8_blocks(_blocks(w))
    return qs.reshape(w.shape), d.half()


def quantize_q4_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (qs uint8 [N, K/2] in GGUF nibble order, d fp16 [N, K/32])."""
    x = _blocks(w)
    # the signed value of largest magnitude (its first occurrence), as ggml picks it
    idx = x.abs().argmax(-1, keepdim=True)
    mx = x.gather(-1, idx)[..., 0]
    d = mx / -8
    q = torch.trunc(x * _inverse(d)[..., None] + 8.5).clamp(max=15).to(torch.uint8)  # C's (int8_t) cast truncates
    packed = q[..., :16] | (q[..., 16:] << 4)
    N, K = w.shape
    return packed.reshape(N, K // 2), d.half()


def all_finite(t: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN and no infinity: one aminmax (a NaN propagates through it), at
    about the speed of a copy."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def finite_scales(name: str, qs: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether every scale of a quantized tensor is a finite number (d's, or those inside K-quant blocks). A
    NaN or infinite scale is a corrupt tensor: the reference gives NaN rows, the kernels other garbage."""
    return all_finite((kquants.block_scales(name, qs) if name in K_KIND else d).float())


def dequantize(name: str, qs: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights [N, K] a quantized tensor stands for (the reference every kernel is tested against)."""
    N = qs.shape[0]
    if name in K_KIND:
        w = kquants.dequantize_q4_k(qs) if name == "q4_k" else kquants.dequantize_q6_k(qs)
        return w.to(dtype)
    scale = d.float()[..., None]
    if name == "q8_0":
        w = qs.float().reshape(N, -1, BLOCK) * scale
    elif name == "q4_0":
        b = qs.reshape(N, -1, 16)
        q = torch.cat([b & 0x0F, b >> 4], dim=-1).float() - 8
        w = q * scale
    else:
        layout(name)
        raise AssertionError(name)
    return w.reshape(N, -1).to(dtype)


def _k_blocks(name: str, w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    if K % kquants.QK:
        raise QuantError(f"cannot quantize a [{N}, {K}] matrix to {name}: K must be a multiple of {kquants.QK}")
    return w


def quantize(name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (qs, d) in layout `name` (the torch reference quantizer)."""
    if name in K_KIND:
        q = (kquants.quantize_q4_k if name == "q4_k" else kquants.quantize_q6_k)(_k_blocks(name, w))
        return q, torch.empty(w.shape[0], 0, dtype=torch.float16)
    if name == "q8_0":
        return quantize_q8_0(w)
    if name == "q4_0":
        return quantize_q4_0(w)
    layout(name)
    raise AssertionError(name)


def quantize_fast(name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize`, through the C++ kernels where they are built (the AVX512 or the portable ones: the same
    bytes, tested; ~100x faster, which is what makes quantizing a 9B at load a matter of seconds), the torch
    reference otherwise."""
    from ..ops import kernels

    if w.dtype in (torch.bfloat16, torch.float32) and w.dim() == 2 and name in LAYOUTS and LAYOUTS[name].fits(w.shape[1]):
        # the AVX512 build, else the portable one (the same quantizers.h): the torch reference quantizes q4_k at
        # ~2 million weights a second, minutes for a 0.8B
        prefix = "" if kernels.available() else "portable_" if kernels.portable_available() else None
        if prefix is not None:
            if name in K_KIND:
                qs = getattr(torch.ops.qwen35, prefix + "quantize_k")(w.contiguous(), K_KIND[name])
                return qs, torch.empty(w.shape[0], 0, dtype=torch.float16)
            return getattr(torch.ops.qwen35, prefix + "quantize_weights")(w.contiguous(), 8 if name == "q8_0" else 4)
    return quantize(name, w)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the integer kernels do to their input rows: x [M, K] -> (xq int8 [M, K], dx fp32 [M, K/32]),
    per block of 32, q8_0-style (max |x| / 127, round half away from zero)."""
    xq, dx = _int8_blocks(_blocks(x))
    return xq.reshape(x.shape), dx


def reference_matmul(name: str, x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """What the decode kernels compute, in torch: x [M, K] quantized per block as the kernels do, times the
    dequantized weights, in fp32. Returns [M, N] fp32."""
    xq, dx = quantize_activations(x)
    xs = (xq.float().reshape(x.shape[0], -1, BLOCK) * dx[..., None]).reshape(x.shape)
    return xs @ dequantize(name, qs, d).t()
