"""gemm_panels (kernels/amx_panels.cpp): the dequantizing prefill path's kernel for a few dozen to a few hundred
rows where oneDNN's micro-kernel has AMX tiles. It must compute F.linear(x, dequantize(W)) (bf16 weights and
inputs, fp32 sums): tested against that reference within the reference's own fp32 rounding, for every layout,
row counts that are not multiples of 16 and weight counts that are not multiples of the 32-row panel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen35.ops import kernels
from qwen35.quant import weight as qw
from qwen35.quant.weight import GEMM_KINDS, QuantizedWeight

pytestmark = pytest.mark.skipif(not (kernels.available() and torch.ops.qwen35.panels_supported()),
                                reason="no AMX-BF16 tiles for oneDNN's micro-kernel on this CPU: the integer and "
                                       "dequantizing GEMMs run instead (tested in test_quant.py)")


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize(("N", "K", "M"), [(40, 256, 1), (100, 512, 17), (520, 1024, 64), (48, 3584, 33)])
def test_panels_compute_f_linear_on_the_dequantized_weights(scheme, N, K, M):
    g = torch.Generator().manual_seed(N + K + M)
    w = QuantizedWeight.quantize(scheme, torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g).bfloat16()
    wd = w.dequantize(torch.bfloat16)
    exact = x.double() @ wd.double().t()
    ref = F.linear(x.float(), wd.float())  # the reference in fp32, and its own rounding error
    tol = 4 * (ref.double() - exact).abs().max().item() + 1e-6 * exact.abs().max().item()
    y = torch.ops.qwen35.gemm_panels(x, w.qs, w.d, GEMM_KINDS[scheme], True)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert (y.double() - exact).abs().max().item() <= tol
    yb = torch.ops.qwen35.gemm_panels(x, w.qs, w.d, GEMM_KINDS[scheme], False)
    assert yb.dtype == torch.bfloat16  # the fp32 result rounded once: within one bf16 step of it
    assert ((yb.double() - y.double()).abs() <= y.double().abs() * 2**-8 + 1e-30).all()


@pytest.mark.parametrize(("N", "K", "M"), [(40, 256, 1), (64, 512, 17), (100, 1024, 33)])
def test_panels_on_bf16_weights_read_them_in_place(N, K, M):
    """Layout code 0: a bf16 matrix, its full panels read where they lie (a short last panel copied and padded)."""
    g = torch.Generator().manual_seed(N + M)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    exact = x.double() @ w.double().t()
    ref = F.linear(x.float(), w.float())
    tol = 4 * (ref.double() - exact).abs().max().item() + 1e-6 * exact.abs().max().item()
    y = torch.ops.qwen35.gemm_panels(x, w, torch.empty(0), 0, True)
    assert (y.double() - exact).abs().max().item() <= tol


def test_quantized_weights_take_the_panels_up_to_their_row_limit(monkeypatch):
    """QuantizedWeight.matmul on the dequantizing path: the panel kernel up to PANEL_MAX_ROWS rows, dequantized
    bands and torch's GEMM past it; a stacked projection (int4's q4_k rows with q8_0 gates) runs each part on it."""
    from qwen35.ops.linear import StackedWeight

    monkeypatch.setattr(qw, "PREFILL_GEMM", "dequantize")
    g = torch.Generator().manual_seed(0)
    w = QuantizedWeight.quantize("q4_k", torch.randn(96, 512, generator=g))
    w.kernels = True
    gates = QuantizedWeight.quantize("q8_0", torch.randn(16, 512, generator=g))
    gates.kernels = True
    stacked = StackedWeight([w, gates])
    with torch.no_grad():
        x = torch.randn(qw.PANEL_MAX_ROWS, 512, generator=g).bfloat16()
        assert torch.equal(w.matmul(x, False), torch.ops.qwen35.gemm_panels(x, w.qs, w.d, 3, False))
        both = torch.cat([torch.ops.qwen35.gemm_panels(x, w.qs, w.d, 3, False),
                          torch.ops.qwen35.gemm_panels(x, gates.qs, gates.d, 1, False)], -1)
        assert torch.equal(stacked.matmul(x, False), both)
        x = torch.randn(qw.PANEL_MAX_ROWS + 1, 512, generator=g).bfloat16()
        assert torch.equal(w.matmul(x, False), F.linear(x, w.dequantize(torch.bfloat16)))
        monkeypatch.setattr(qw, "USE_PANELS", False)  # the switch the tests use; the machine decides otherwise
        x = x[:64]
        assert torch.equal(w.matmul(x, False), F.linear(x, w.dequantize(torch.bfloat16)))


def test_panels_name_bad_inputs():
    w = QuantizedWeight.quantize("q8_0", torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="gemm_panels: x has 32 columns"):
        torch.ops.qwen35.gemm_panels(torch.zeros(2, 32, dtype=torch.bfloat16), w.qs, w.d, 1, False)
    with pytest.raises(RuntimeError, match="gemm_panels: x must be a contiguous bf16"):
        torch.ops.qwen35.gemm_panels(torch.zeros(2, 64), w.qs, w.d, 1, False)
    with pytest.raises(RuntimeError, match="gemm_panels: unknown layout code 7"):
        torch.ops.qwen35.gemm_panels(torch.zeros(2, 64, dtype=torch.bfloat16), w.qs, w.d, 7, False)


def test_bf16_weights_take_the_panels_between_the_gemv_and_their_row_limit(monkeypatch):
    """GemvWeight (a bf16 model's matrices): the GEMV up to GEMV_MAX_ROWS rows, the panel kernel up to
    BF16_PANEL_MAX_ROWS, torch's GEMM past it or with the panels off."""
    from qwen35.ops.fast import GEMV_MAX_ROWS, GemvWeight

    g = torch.Generator().manual_seed(3)
    w = GemvWeight(torch.randn(80, 256, generator=g).bfloat16())
    with torch.no_grad():
        for rows in (GEMV_MAX_ROWS + 1, qw.BF16_PANEL_MAX_ROWS):
            x = torch.randn(rows, 256, generator=g).bfloat16()
            y = torch.ops.qwen35.gemm_panels(x, w.weight, torch.empty(0), 0, False)
            assert torch.equal(w.matmul(x, False), y) and torch.equal(w.matmul(x, True), y.float())
        x = torch.randn(qw.BF16_PANEL_MAX_ROWS + 1, 256, generator=g).bfloat16()
        assert torch.equal(w.matmul(x, False), F.linear(x, w.weight))
        monkeypatch.setattr(qw, "USE_PANELS", False)
        x = x[:20]
        assert torch.equal(w.matmul(x, False), F.linear(x, w.weight))


def test_bf16_model_prompt_through_the_panels_matches_the_reference():
    """The bundled model through load_model in bf16 with its kernels bound (a 40-token prompt: every matrix on
    the panel kernel) against the same model on the reference path: the last position's logits are no further
    from the fp32 model's than the bf16 reference's own distance from it (x2), and the same next token."""
    from pathlib import Path

    from qwen35.ops.fast import bind_kernels
    from qwen35.weights import load_model

    bundled = Path(__file__).resolve().parents[1] / "qwen35" / "assets" / "model"
    fast = load_model(bundled, dtype=torch.bfloat16, kernels=True)
    assert bind_kernels(fast, True).bound.get("gemv")  # below kernel_policy's size: bound by hand
    slow = load_model(bundled, dtype=torch.bfloat16, kernels=False)
    exact = load_model(bundled, dtype=torch.float32, kernels=False)
    ids = torch.randint(0, fast.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got, ref, ref32 = (m(ids)[0, -1].float() for m in (fast, slow, exact))
    assert (got - ref32).abs().max() <= 2 * (ref - ref32).abs().max()
    assert got.argmax() == ref.argmax()
