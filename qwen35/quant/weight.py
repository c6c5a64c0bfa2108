"""A block-quantized matrix as a weight object (ops/linear.py): it plugs into `linear()` and everything that
calls it, the MTP head and the vocabulary projection included, without a branch in any model file.

- decode (<= 8 rows): the VNNI GEMV on the packed bytes (ops/kernels/quant_kernels.cpp for q8_0 / q4_0,
  quant_k_kernels.cpp for q4_k / q6_k), read once per token and never expanded in memory;
- more rows (prefill, many sequences), as `prefill_gemm()` picks for the machine and the row count: the VNNI
  integer GEMM on the packed weights (ops/kernels/quant_gemm.cpp: the GEMVs' rule, inputs quantized; 2.3-3.4x
  the bf16 GEMM of a CPU without AMX) or, for long chunks where torch's bf16 GEMM has AMX tiles, the weights
  dequantized to bf16 a band of rows at a time for that GEMM (no full-size bf16 copy ever exists); where the AVX512
  kernels cannot run, the portable library's GEMVs and its AVX2 integer GEMM (portable_gemm.cpp, the same rule);
- `rows(ids)`: dequantized rows (the embedding lookup of a tied, quantized embedding/head);
- training on a frozen quantized base (QLoRA, train/qlora.py): when the input needs a gradient, the GEMM path
  runs as an autograd function (`QuantizedMatmul`) that saves nothing but a reference to the weight object;
  backward dequantizes the same bands again and accumulates dX = dY W band by band, so neither pass ever
  holds more than one band of full-precision weights. The weight itself gets no gradient (it is frozen).
The reference (`formats.reference_matmul`) is what the kernels compute and are tested against.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from ..ops.linear import dense_linear
from . import formats

GEMV_MAX_ROWS = 8
# Measured on the 0.8B's 8224x1024 in-projection, weights cold (2 threads, Sapphire Rapids): 9-16 rows are
# fastest as GEMVs of 8 (0.8-1.3 ms: memory-bound passes) against the integer GEMM's 1.2-1.5 and dequantize +
# AMX's 2.6; the integer GEMM then wins up to ~96 rows for q8_0 (64: 2.4 against 3.1 ms), ~64 for q4_k and ~56
# for q6_k, whose unpacking costs more. In the whole 0.8B (bench_quant_prefill) the crossings come earlier:
# int8 prefill of 64 tokens 0.83x bf16 integer against 0.79x dequantizing, 128 tokens 0.76x against 0.85x;
# int4 32 tokens 0.78x against 0.75x, 64 tokens 0.72x against 0.79x. A 16-row decode step (many sequences):
# int4 290 -> 148 ms, int8 182 -> 147 ms (it had dequantized the whole head every step).
GEMV_CHUNK_MAX_ROWS = 16
# The portable library's integer GEMM (kernels/portable_gemm.cpp, every layout: GEMM_KINDS' codes), measured
# where the AVX512 kernels cannot run (a Zen 4 held to AVX2: QWEN35_PORTABLE_MARCH=x86-64-v3, oneDNN at AVX2),
# 2 threads, the 0.8B's 7168 x 1024 / 1024 x 3584, ms, against dequantizing into bf16 and torch's fp32 GEMM
# (what ran before): q4_k 16 rows 1.1 / 1.1 against 6.9 / 3.0, 64 rows 3.2 / 3.0 against 11.2 / 4.3, 128 rows
# 6.4 / 4.0 against 17.1 / 6.7; q6_k alike (16 rows 1.4 / 0.9 against 8.0 / 2.9); q8_0 32 rows 3.4 / 1.6
# against 9.7 / 3.3, 512 rows 31.8 / 17.4 against 48.2 / 21.5 (with vpdpbusd: 14.2 / 7.9). GEMVs of 8 rows
# stay slightly ahead up to 16 rows (q4_k 1.2 / 1.0 ms at 16) and keep them: prefill_gemm() is "integer" at
# any size on such a machine.
AMX_INTEGER_MAX_ROWS = {"q8_0": 64, "q4_0": 64, "q4_k": 40, "q6_k": 40}
GEMV_OPS = {"q8_0": "gemv_q8_0", "q4_0": "gemv_q4_0", "q4_k": "gemv_q4_k", "q6_k": "gemv_q6_k"}
BAND_BYTES = 64 * 2**20  # bf16 bytes of weights dequantized at once on the GEMM path
GEMM_KINDS = formats.KERNEL_CODES  # the layout codes the GEMM / portable kernels take
PREFILL_GEMM: str | None = None  # "integer" / "dequantize" to override prefill_gemm() (tests)
_auto_gemm: list[str] = []
# The dequantizing path's kernel for up to PANEL_MAX_ROWS rows where oneDNN's micro-kernel has AMX tiles
# (kernels/amx_panels.cpp: 32-row weight panels dequantized into L1/L2, F.linear's result up to the order of its
# fp32 sums); past it, dequantized bands and oneDNN's own GEMM. Measured on the 0.8B's four shapes, weights
# cold, 2 threads (Sapphire Rapids class): 17-128 rows 1.1-2.2x the integer GEMM and 1.3-3.2x dequantize +
# oneDNN, at or below bf16 weights' own GEMM time in most; 256 rows level with dequantize + oneDNN (0.94-1.20x),
# 512 rows 0.2-0.44x (the packed inputs outgrow L2). In the whole 0.8B (bench_quant_prefill, x bf16, panels
# against without): 32 tokens int8 1.21 / 0.94, int4 1.20 / 0.89; 64: 1.19 / 0.89, 1.12 / 0.71; 128: 1.06 /
# 0.84, 1.03 / 0.83; 192: 0.97 / 0.83, 0.92 / 0.86; 256: 0.96 / 0.90 but int4 0.87 / 0.92. So on AMX the
# integer kernels keep only the GEMVs of 8 (up to GEMV_CHUNK_MAX_ROWS rows) and the panels take 17-192.
PANEL_MAX_ROWS = 192
# bf16 weights (ops/fast.GemvWeight) on the same kernel, read in place: 9-128 rows. Against oneDNN's bf16 GEMM
# on the 0.8B's shapes, weights cold, 2 threads: 17 / 32 / 64 / 128 rows 1.03-1.33 / 1.06-1.44 / 1.13-1.47 /
# 0.97-1.37x (the 248320-row head 1.30 / 1.30 / 1.47 / 1.09x); 192 rows 0.80-1.26x.
BF16_PANEL_MAX_ROWS = 128
USE_PANELS: bool | None = None  # force the panel kernel on / off (tests); None: where the CPU supports it
_panels: list[bool] = []


def panels() -> bool:
    """Whether the AMX panel kernel may run on this machine (quantized weights' dequantizing path, bf16 weights'
    GemvWeight)."""
    if USE_PANELS is not None:
        return USE_PANELS
    if os.environ.get("QWEN35_GEMM_PANELS", "1") == "0":  # off by hand: the integer / dequantizing GEMMs alone
        return False
    if not _panels:
        from ..ops import kernels

        _panels.append(kernels.available() and prefill_gemm_machine() == "amx" and torch.ops.qwen35.panels_supported())
    return _panels[0]


def prefill_gemm(rows: int, scheme: str = "q8_0") -> str:
    """How a quantized weight in `scheme` meets `rows` (> GEMV_MAX_ROWS) input rows: "integer" (inputs quantized
    per block as the GEMVs do: GEMVs of 8 rows up to gemv_chunk_max_rows(), the VNNI GEMM past that) or
    "dequantize" (the AMX panel kernel up to PANEL_MAX_ROWS rows, bf16 bands and torch's GEMM past it). Where
    torch's GEMM has AMX tiles: integer up to GEMV_CHUNK_MAX_ROWS rows (AMX_INTEGER_MAX_ROWS[scheme] where the
    panel kernel is off), dequantize past it (AMX-BF16 then beats every integer kernel measured here, README).
    Integer at any size where the kernels run without AMX, or the portable library with its AVX2 GEMM (GEMVs of 8
    up to GEMV_CHUNK_MAX_ROWS rows, the GEMM past that); dequantize elsewhere.
    QWEN35_QUANT_GEMM=integer / dequantize forces one; ONEDNN_MAX_CPU_ISA capping oneDNN below AMX counts as no
    AMX. A weight's kernels and its reference path follow the same choice, so they compute the same thing."""
    if PREFILL_GEMM is not None:
        return PREFILL_GEMM
    env = os.environ.get("QWEN35_QUANT_GEMM", "").strip().lower()
    if env in ("integer", "dequantize"):
        return env
    if env:
        raise ValueError(f"QWEN35_QUANT_GEMM={env!r}: expected 'integer' or 'dequantize'")
    machine = prefill_gemm_machine()
    if machine == "amx":  # with the panel kernel, dequantizing wins from 17 rows on (PANEL_MAX_ROWS' note)
        limit = GEMV_CHUNK_MAX_ROWS if panels() else AMX_INTEGER_MAX_ROWS[scheme]
        return "integer" if rows <= limit else "dequantize"
    # "portable": the note below GEMV_CHUNK_MAX_ROWS
    return "integer" if machine in ("integer", "portable") else "dequantize"


def gemv_chunk_max_rows(scheme: str, n: int) -> int:
    """Up to how many input rows the AVX512 kernels run GEMVs of 8 rather than the integer GEMM. q8_0 and q4_0
    without AMX: GEMV_MAX_ROWS, the GEMM from 9 rows on, since its panels unpack 16 rows x 8 blocks at a time
    (twenty-third session; 8224x1024 / 1024x3584, weights cold, 2 threads, Zen 4, 12 / 16 rows, ms, GEMM against
    GEMVs of 8: q8_0 0.85 / 0.85 against 0.91 / 1.19, q4_0 0.64 / 0.75 against 0.85 / 1.26; the 0.8B int8's
    prefill of 10 / 16 tokens 1.04x / 1.23x, one process alternating). The K-quants keep GEMVs up to GEMV_CHUNK_MAX_ROWS:
    alone their GEMM won from 12 rows (q4_k 0.71 / 0.77 against 0.73 / 0.91 ms), but the int4 0.8B's prefill of
    9 / 10 / 12 / 14 tokens ran 0.90x / 0.91x / 0.97x / 0.99x with it, in one process alternating. With AMX:
    GEMV_CHUNK_MAX_ROWS for all, measured there before that change and not since (no AMX machine since). n: the
    weight's output rows; under 256 (int4's 16- or 32-row gate projections) GEMVs stay: the GEMM's panels of 32
    rows are its unit of threads, so such a matrix ran on one core (the int4 0.8B at 10 tokens: 0.96x with them
    on the GEMM)."""
    if scheme in ("q8_0", "q4_0") and n >= 256 and prefill_gemm_machine() != "amx":
        return GEMV_MAX_ROWS
    return GEMV_CHUNK_MAX_ROWS


def prefill_gemm_machine() -> str:
    """"amx" (oneDNN's GEMM has AMX tiles), "integer" (the AVX512 kernels run, no AMX), "portable" (the portable
    library runs with its AVX2 GEMM: kernels/portable_gemm.cpp) or "none"."""
    if not _auto_gemm:
        from ..ops import kernels

        cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
        amx = "amx_bf16" in kernels.cpu_flags() and (cap in ("ALL", "DEFAULT") or "AMX" in cap)
        if kernels.available():
            machine = "amx" if amx else "integer"
        elif kernels.portable_gemm_vectorized():
            machine = "portable"
        else:
            machine = "none"
        _auto_gemm.append(machine)
    return _auto_gemm[0]


_once = threading.local()


@contextlib.contextmanager
def dequantized_once(budget: int):
    """Inside: each weight's GEMM path dequantizes it once and reuses that matrix for every call, until the
    kept matrices hold `budget` bytes (past that, weights dequantize per call as outside). For a scope that
    runs the same layer over several chunks of one prompt (Qwen35ForCausalLM.prefill_by_layer): the chunks
    after the first skip the dequantization. The matrices are dropped on exit; scopes do not nest."""
    _once.memo, _once.bytes, _once.budget = {}, 0, budget
    try:
        yield
    finally:
        _once.memo = None


def kept(obj, dtype: torch.dtype, make) -> torch.Tensor | None:
    """Inside dequantized_once(): weight object `obj` as a dense matrix in `dtype` (the scope's copy, made by
    make() on first use while within the scope's budget); None outside a scope or past the budget."""
    memo = getattr(_once, "memo", None)
    if memo is None:
        return None
    key = (id(obj), dtype)
    if key in memo:
        return memo[key][1]
    nbytes = obj.shape.numel() * dtype.itemsize
    if _once.bytes + nbytes > _once.budget:
        return None
    w = make()
    memo[key] = (obj, w)  # the weight object kept alive with it, so its id is never reused meanwhile
    _once.bytes += nbytes
    return w


class QuantizedWeight:
    """W [N, K] as (qs, d) in layout `scheme` (formats.LAYOUTS)."""

    def __init__(self, scheme: str, qs: torch.Tensor, d: torch.Tensor, K: int):
        self.layout = formats.layout(scheme)
        self.scheme = scheme
        self.qs, self.d = qs, d
        self.shape = torch.Size((qs.shape[0], K))
        self.dtype = torch.bfloat16  # what it computes in
        self.kernels = False  # set by ops/fast.bind_kernels where the VNNI kernels can run
        self.portable = False  # set by bind_kernels where they cannot: kernels/portable_kernels.cpp instead

    @classmethod
    def quantize(cls, scheme: str, w: torch.Tensor) -> QuantizedWeight:
        qs, d = formats.quantize(scheme, w)
        return cls(scheme, qs, d, w.shape[1])

    def slice(self, start: int, end: int) -> QuantizedWeight:
        """Rows start..end-1 as a weight of their own (views: no copy), e.g. one projection of a fused group."""
        w = QuantizedWeight(self.scheme, self.qs[start:end], self.d[start:end], self.shape[1])
        w.dtype = self.dtype
        return w

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        return self.qs.numel() * self.qs.element_size() + self.d.numel() * self.d.element_size()

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized matrix (bf16), for code that needs a plain tensor (export, tests)."""
        return self.dequantize(torch.bfloat16)

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start..end-1 in `dtype`; into `out` (contiguous, of that shape and dtype) when given."""
        qs, d = self.qs[start:end], self.d[start:end]
        if (self.kernels or self.portable) and dtype == torch.bfloat16:
            return self._dequantize_bf16(qs, d, out)
        w = formats.dequantize(self.scheme, qs, d, dtype)
        return w if out is None else out.copy_(w)

    def _dequantize_bf16(self, qs: torch.Tensor, d: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (qs, d) of this layout dequantized to bf16 by the kernels (the reference's bits, tested)."""
        if out is None:
            out = torch.empty(qs.shape[0], self.shape[1], dtype=torch.bfloat16, device=qs.device)
        if not self.kernels:  # the portable kernel: the same bits
            torch.ops.qwen35.portable_dequant_bf16_out(qs.contiguous(), d.contiguous(), GEMM_KINDS[self.scheme], out)
        elif self.scheme in formats.K_KIND:
            torch.ops.qwen35.dequant_k_bf16_out(qs.contiguous(), formats.K_KIND[self.scheme], out)
        else:
            bits = 8 if self.scheme == "q8_0" else 4
            torch.ops.qwen35.dequant_bf16_out(qs.contiguous(), d.contiguous(), bits, out)
        return out

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W[ids] dequantized: [*ids.shape, K]."""
        flat = ids.reshape(-1)
        if (self.kernels or self.portable) and dtype == torch.bfloat16:  # the reference's bits without its ~15 small torch ops:
            out = self._dequantize_bf16(self.qs[flat], self.d[flat])  # a q6_k embedding row 103 -> 15 us
        else:
            out = formats.dequantize(self.scheme, self.qs[flat], self.d[flat], dtype)
        return out.reshape(*ids.shape, self.shape[1])

    def matmul(self, x2: torch.Tensor, out_fp32: bool) -> torch.Tensor:
        if x2.shape[0] <= GEMV_MAX_ROWS and not torch.is_grad_enabled():
            if self.kernels:
                op = getattr(torch.ops.qwen35, GEMV_OPS[self.scheme])
                return op(x2.contiguous(), self.qs, self.d, out_fp32)
            # what the kernel computes (inputs quantized per block too), so both paths give the same tokens:
            # the portable kernel, or the reference a band of weight rows at a time
            return self._integer_matmul(x2, out_fp32)
        if x2.requires_grad and torch.is_grad_enabled():
            # autograd would otherwise keep every dequantized band alive until backward: a full copy
            return QuantizedMatmul.apply(x2, self, out_fp32)
        if (not torch.is_grad_enabled() and x2.dtype in (torch.bfloat16, torch.float32)
                and prefill_gemm(x2.shape[0], self.scheme) == "integer"):
            return self._integer_matmul(x2, out_fp32)
        return self._banded_matmul(x2, out_fp32)

    def _integer_matmul(self, x2: torch.Tensor, out_fp32: bool) -> torch.Tensor:
        """Inputs quantized per block, integer dot products (formats.reference_matmul): GEMVs of 8 rows or the
        VNNI GEMM, or that reference a band of weight rows at a time (fp32 dequantized: 4 bytes a weight)."""
        if self.kernels:
            x2 = x2.contiguous()
            if x2.shape[0] <= gemv_chunk_max_rows(self.scheme, self.shape[0]):
                op = getattr(torch.ops.qwen35, GEMV_OPS[self.scheme])
                return torch.cat([op(x2[i : i + GEMV_MAX_ROWS], self.qs, self.d, out_fp32)
                                  for i in range(0, x2.shape[0], GEMV_MAX_ROWS)])
            return torch.ops.qwen35.gemm_quant(x2, self.qs, self.d, GEMM_KINDS[self.scheme], out_fp32)
        if self.portable and x2.dtype in (torch.bfloat16, torch.float32):
            if x2.shape[0] > GEMV_CHUNK_MAX_ROWS:
                return torch.ops.qwen35.portable_gemm(x2, self.qs, self.d, GEMM_KINDS[self.scheme], out_fp32)
            return torch.ops.qwen35.portable_gemv(x2, self.qs, self.d, GEMM_KINDS[self.scheme], out_fp32)
        # fp32 bands: the whole 248,320-row head at once had peaked at ~10 GB for a 0.8B model
        step = max(1, BAND_BYTES // (4 * self.shape[1]))
        y = torch.cat([formats.reference_matmul(self.scheme, x2, self.qs[s : s + step], self.d[s : s + step])
                       for s in range(0, self.shape[0], step)], -1)
        return y if out_fp32 else y.to(x2.dtype)

    def _bands(self) -> range:
        return range(0, self.shape[0], max(1, BAND_BYTES // (2 * self.shape[1])))

    def _banded_matmul(self, x2: torch.Tensor, out_fp32: bool) -> torch.Tensor:
        dtype = x2.dtype if x2.dtype in (torch.bfloat16, torch.float32) else torch.float32
        if self.kernels and dtype == torch.bfloat16 and x2.shape[0] <= PANEL_MAX_ROWS and panels():
            # whether or not a dequantized_once scope keeps a copy (one kernel for these rows, so prefill by layer
            # and chunk by chunk round alike); rounded to bf16 as the reference's bf16 GEMM rounds, fp32 or not
            y = torch.ops.qwen35.gemm_panels(x2.contiguous(), self.qs, self.d, GEMM_KINDS[self.scheme], False)
            return y.float() if out_fp32 else y
        kept, bands = self._kept(dtype), self._bands()
        if kept is not None:
            y = dense_linear(x2.to(dtype), kept)
        elif len(bands) == 1:
            y = dense_linear(x2.to(dtype), self.dequantize(dtype))
        else:
            y = torch.cat([dense_linear(x2.to(dtype), self.dequantize(dtype, s, s + bands.step)) for s in bands], -1)
        return y.float() if out_fp32 else y.to(x2.dtype)

    def _kept(self, dtype: torch.dtype) -> torch.Tensor | None:
        return kept(self, dtype, lambda: self.dequantize(dtype))

    def input_grad(self, grad_y: torch.Tensor) -> torch.Tensor:
        """dY [M, N] -> dX = dY W [M, K], dequantizing W band by band in dY's dtype (fp32 accumulation
        across bands when dY is bf16: a sum of ~N/band rounded partial products would lose bits)."""
        dtype = grad_y.dtype if grad_y.dtype in (torch.bfloat16, torch.float32) else torch.float32
        g = grad_y.to(dtype)
        bands = self._bands()
        if len(bands) == 1:
            return g @ self.dequantize(dtype)
        out = torch.zeros(g.shape[0], self.shape[1], dtype=torch.float32, device=g.device)
        for s in bands:
            e = min(s + bands.step, self.shape[0])
            out += (g[:, s:e] @ self.dequantize(dtype, s, e)).float()
        return out.to(dtype)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.scheme}, {tuple(self.shape)})"


class QuantizedMatmul(torch.autograd.Function):
    """y = x W^T with W a frozen QuantizedWeight: forward and backward both dequantize band by band, and the
    graph keeps only the weight object (its packed bytes, which exist anyway), never a dequantized copy."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, w: QuantizedWeight, out_fp32: bool) -> torch.Tensor:
        ctx.w, ctx.x_dtype = w, x2.dtype
        with torch.no_grad():
            return w._banded_matmul(x2, out_fp32)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return ctx.w.input_grad(grad_y).to(ctx.x_dtype), None, None
