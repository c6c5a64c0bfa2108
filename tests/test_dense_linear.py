"""ops/linear.dense_linear: on a CPU without bf16 matrix instructions a bf16 product of many rows runs in fp32 on
the same values (ops/kernels.bf16_matmul_native says which CPU is which). Checked against an fp64 reference,
against torch's bf16 product where it stays, and end to end: the bundled model's greedy answers either way."""

import pytest
import torch
import torch.nn.functional as F
from greedy_ties import BUNDLED_PROMPTS, assert_same_greedy_tokens

import qwen35
from qwen35.ops import kernels
from qwen35.ops import linear as lin
from qwen35.quant import QuantizedWeight
from qwen35.quant import weight as qw


@pytest.fixture
def without_bf16(monkeypatch):
    monkeypatch.setattr(lin, "_bf16_native", lambda: False)


def within_bf16_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """y is the exact product rounded to bf16, up to fp32 summation error (sums of |terms| times 1e-6)."""
    ref = x.double() @ w.double().t()
    err = 1e-6 * (x.double().abs() @ w.double().abs().t())
    return bool(((y.double() - ref).abs() <= 2.0**-8 * ref.abs() + err + 1e-30).all())


def test_which_machines_have_bf16_products(monkeypatch):
    import platform

    monkeypatch.delenv("QWEN35_BF16_MATMUL", raising=False)
    with monkeypatch.context() as m:  # a Mac: torch's fp32 GEMM there is Accelerate's, its bf16 one generic loops
        m.setattr(kernels.sys, "platform", "darwin")
        assert not kernels.bf16_matmul_native()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert kernels.bf16_matmul_native()
        return
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert kernels.bf16_matmul_native() == bool({"avx512_bf16", "amx_bf16"} & kernels.cpu_flags())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # what oneDNN is then allowed: no bf16 instructions
    assert not kernels.bf16_matmul_native()


def test_the_choice_can_be_forced(monkeypatch):
    monkeypatch.setenv("QWEN35_BF16_MATMUL", "fp32")
    assert not kernels.bf16_matmul_native()
    monkeypatch.setenv("QWEN35_BF16_MATMUL", "native")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert kernels.bf16_matmul_native()
    monkeypatch.setenv("QWEN35_BF16_MATMUL", "yes")
    with pytest.raises(ValueError, match="QWEN35_BF16_MATMUL must be 'native' or 'fp32', got 'yes'"):
        kernels.bf16_matmul_native()


@pytest.mark.parametrize("rows,N,K,band_rows", [(16, 40, 64, 64), (37, 300, 128, 64), (300, 97, 256, 10)])
def test_fp32_route_is_the_product_rounded_to_bf16(rows, N, K, band_rows, without_bf16, monkeypatch):
    monkeypatch.setattr(lin, "FP32_BAND_BYTES", 4 * K * band_rows)  # several bands, the last one short
    g = torch.Generator().manual_seed(rows + N)
    x = torch.randn(rows, K, generator=g).bfloat16()
    w = (torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)).bfloat16()
    with torch.no_grad():
        y = lin.dense_linear(x, w)
        native = F.linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, N)
    assert within_bf16_rounding(y, x, w) and within_bf16_rounding(native, x, w)
    if N <= band_rows:  # one band: torch's fp32 product of the same values, bit for bit
        assert torch.equal(y, F.linear(x.float(), w.float()).bfloat16())


def test_what_stays_on_the_bf16_product(without_bf16):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 64, generator=g).bfloat16()
    x = torch.randn(lin.FP32_GEMM_MIN_ROWS - 1, 64, generator=g).bfloat16()
    with torch.no_grad():  # few rows: memory-bound, left as it is
        assert torch.equal(lin.dense_linear(x, w), F.linear(x, w))
    x = torch.randn(40, 64, generator=g).bfloat16()
    with torch.enable_grad():  # autograd: torch's product
        assert torch.equal(lin.dense_linear(x, w), F.linear(x, w))


def test_quantized_prefill_takes_it(without_bf16, monkeypatch):
    # a quantized weight's dequantized bands (what a CPU without the AVX512 kernels or the portable AVX2 GEMM runs
    # for prefill)
    g = torch.Generator().manual_seed(1)
    w = QuantizedWeight.quantize("q4_k", torch.randn(96, 512, generator=g))
    x = torch.randn(40, 512, generator=g).bfloat16()
    monkeypatch.setattr(qw, "_auto_gemm", ["none"])  # a CPU without the portable AVX2 GEMM (ARM, pre-AVX2 x86)
    calls = []
    monkeypatch.setattr(lin.F, "linear", lambda a, b: calls.append(a.dtype) or torch.matmul(a, b.t()))
    with torch.no_grad():
        y = w.matmul(x, False)
    assert calls and set(calls) == {torch.float32}
    assert within_bf16_rounding(y, x, w.dequantize(torch.bfloat16))


def test_bundled_model_answers_the_same(monkeypatch):
    from qwen35.commands.common import default_model

    model, tok = qwen35.load(default_model(), dtype=torch.bfloat16)
    prompts = [tok.encode(t) for t in BUNDLED_PROMPTS]
    params = qwen35.SamplingParams(temperature=0, max_tokens=24)

    def tokens():
        return [[r.token for r in out] for out in qwen35.batch_generate(model, prompts, params)]

    ref = tokens()
    fp32_rows = []
    real = lin.F.linear
    monkeypatch.setattr(lin, "_bf16_native", lambda: False)

    def spy(a, b):
        if a.dtype == torch.float32:
            fp32_rows.append(a.shape[0])
        return real(a, b)

    monkeypatch.setattr(lin.F, "linear", spy)
    got = tokens()
    assert fp32_rows and min(fp32_rows) >= lin.FP32_GEMM_MIN_ROWS  # the prompts' prefill took the fp32 route
    assert_same_greedy_tokens(model, prompts, ref, got)
