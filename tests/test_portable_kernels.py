"""The portable kernels for quantized weights (ops/kernels/portable_kernels.cpp): what runs quantized matrices on a
CPU without AVX512-BF16 / VNNI. Each op against the torch reference it replaces (formats.reference_matmul, the
dequantizers, the quantizers), and a quantized model bound to them, as such a machine binds it, against the same
model on the reference path."""

import os
import platform
import subprocess
import sys

import pytest
import torch
from greedy_ties import assert_same_greedy_answers
from test_kv_cache import largest_sums_cache, rel
from test_quant_k import awkward

import qwen35
from qwen35.ops import fast, kernels, step_forms
from qwen35.quant import QuantizedWeight, formats
from qwen35.quant import weight as qw

pytestmark = pytest.mark.skipif(not kernels.portable_available(),
                                reason=f"portable kernels unavailable: {kernels.portable_reason()}")
KIND = {"q8_0": 1, "q4_0": 2, "q4_k": 3, "q6_k": 4}


def bound(scheme, x, w):
    """The same exact integer block sums combined in another fp32 order: within fp32 rounding of the sum of
    |terms| (the bound the AVX512 kernels' tests use)."""
    M, K = x.shape
    xq, dx = formats.quantize_activations(x)
    xs = (xq.float().reshape(M, -1, 32) * dx[..., None]).reshape(M, K)
    return 1e-6 * (xs.abs() @ formats.dequantize(scheme, w.qs, w.d).abs().t()) + 1e-6


@pytest.mark.parametrize("scheme", list(KIND))
@pytest.mark.parametrize("M,N,K", [(1, 100, 256), (2, 33, 512), (3, 77, 768), (5, 1, 1024), (8, 130, 256),
                                   (11, 17, 512)])
def test_gemv_equals_the_reference(scheme, M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    w = QuantizedWeight.quantize(scheme, awkward(N, K, M) if N >= 5 else torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g).bfloat16()
    x[0, :32] = 0  # an all-zero input block (scale 0)
    assert_integer_product(torch.ops.qwen35.portable_gemv, scheme, x, w)


def assert_integer_product(op, scheme, x, w):
    """op (portable_gemv / portable_gemm) on x against formats.reference_matmul within bound(); bf16 out equal to
    the fp32 out rounded; fp32 inputs of the same values the same bits; each row on its own accumulators, in the
    same order whatever rows share its call (alone, in a batch, in a verify pass or a prefill chunk): the same bits."""
    out = op(x, w.qs, w.d, KIND[scheme], True)
    assert ((out - formats.reference_matmul(scheme, x, w.qs, w.d)).abs() <= bound(scheme, x, w)).all()
    assert torch.equal(op(x, w.qs, w.d, KIND[scheme], False), out.bfloat16())
    assert torch.equal(op(x.float(), w.qs, w.d, KIND[scheme], True), out)
    alone = torch.cat([op(x[i : i + 1], w.qs, w.d, KIND[scheme], True) for i in range(x.shape[0])])
    assert torch.equal(alone, out)


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0"])
@pytest.mark.parametrize("M,N,K", [(1, 19, 32), (3, 20, 96), (2, 9, 160), (9, 40, 224), (1, 64, 288)])
def test_gemv_on_block_counts_the_kernel_does_not_group(scheme, M, N, K):
    # the kernel takes q8_0 / q4_0 blocks four at a time, the last K/32 % 4 one by one
    g = torch.Generator().manual_seed(M * N + K)
    w = QuantizedWeight.quantize(scheme, torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g))
    x = torch.randn(M, K, generator=g).bfloat16()
    out = torch.ops.qwen35.portable_gemv(x, w.qs, w.d, KIND[scheme], True)
    assert ((out - formats.reference_matmul(scheme, x, w.qs, w.d)).abs() <= bound(scheme, x, w)).all()


@pytest.mark.parametrize("scheme", list(KIND))
@pytest.mark.parametrize("M,N,K", [(1, 5, 256), (4, 16, 256), (17, 33, 512), (37, 100, 768), (66, 17, 1024),
                                   (130, 40, 256)])
def test_gemm_equals_the_reference(scheme, M, N, K):
    """The integer GEMM prefill runs on (portable_gemm.cpp): row counts around its tiles of 4, weight counts
    around its panels of 16, blocks the awkward weights' super-blocks make hard (all zero, outliers)."""
    g = torch.Generator().manual_seed(M * N + K)
    w = QuantizedWeight.quantize(scheme, awkward(N, K, M) if N >= 5 else torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g).bfloat16() * torch.rand(M, 1, generator=g).bfloat16() * 4
    x[0, :32] = 0  # an all-zero input block (scale 0)
    x[-1, 32:64] = -1e-3  # a block of one value: it rounds to -127s
    assert_integer_product(torch.ops.qwen35.portable_gemm, scheme, x, w)


def test_gemm_on_q8_0_bytes_the_quantizer_never_writes():
    # GGUF's Q8_0 allows -128 (a file written elsewhere): |q| = 128 meets |x| = 127 in vpmaddubsw's pairs
    g = torch.Generator().manual_seed(5)
    w = QuantizedWeight.quantize("q8_0", torch.randn(24, 256, generator=g))
    w.qs[:, :64] = -128
    w.qs[3] = torch.randint(-128, 128, (256,), generator=g, dtype=torch.int8).view(torch.uint8)
    x = torch.randn(21, 256, generator=g).bfloat16()
    x[:, :32] = -x[:, :32].abs()  # blocks of -127s against the -128s: the largest pairs there are
    out = torch.ops.qwen35.portable_gemm(x, w.qs, w.d, 1, True)
    assert ((out - formats.reference_matmul("q8_0", x, w.qs, w.d)).abs() <= bound("q8_0", x, w)).all()


def test_gemm_refuses_what_does_not_fit():
    with pytest.raises(RuntimeError, match=r"portable_gemm: kind must be 1 \(q8_0\), 2 \(q4_0\), 3 \(q4_k\) or 4 "
                                           r"\(q6_k\), got 7"):
        torch.ops.qwen35.portable_gemm(torch.randn(20, 256), torch.zeros(8, 256, dtype=torch.uint8),
                                       torch.zeros(8, 8).half(), 7, True)
    w = QuantizedWeight.quantize("q4_k", torch.randn(8, 512))
    with pytest.raises(RuntimeError, match=r"portable_gemm: 256 columns do not match weights \[8, 288\] of layout 3"):
        torch.ops.qwen35.portable_gemm(torch.randn(20, 256), w.qs, w.d, 3, True)
    with pytest.raises(RuntimeError, match=r"portable_gemm: x must be bf16 or fp32"):
        torch.ops.qwen35.portable_gemm(torch.randn(20, 512).half(), w.qs, w.d, 3, True)


@pytest.mark.parametrize("scheme", ["q4_k", "q8_0"])
def test_a_quantized_weight_takes_the_gemm_for_prefill(scheme, monkeypatch):
    """On a machine with the AVX2 GEMM (prefill_gemm_machine "portable"), a portable-bound weight's prefill rows
    go through it, up to GEMV_CHUNK_MAX_ROWS rows through GEMVs of 8, and both give what the reference computes."""
    monkeypatch.setattr(qw, "_auto_gemm", ["portable"])
    g = torch.Generator().manual_seed(3)
    w = QuantizedWeight.quantize(scheme, torch.randn(40, 512, generator=g))
    w.portable = True
    calls = []
    for op in ("portable_gemm", "portable_gemv"):
        real = getattr(torch.ops.qwen35, op)
        monkeypatch.setattr(torch.ops.qwen35, op, lambda *a, _op=op, _real=real: calls.append(_op) or _real(*a))
    with torch.no_grad():
        for rows, want in [(8, "portable_gemv"), (16, "portable_gemv"), (17, "portable_gemm"), (300, "portable_gemm")]:
            calls.clear()
            x = torch.randn(rows, 512, generator=g).bfloat16()
            y = w.matmul(x, True)
            assert calls == [want]
            assert ((y - formats.reference_matmul(scheme, x, w.qs, w.d)).abs() <= bound(scheme, x, w)).all()


def test_gemv_refuses_mismatched_operands():
    w = QuantizedWeight.quantize("q4_k", torch.randn(8, 512))
    with pytest.raises(RuntimeError, match=r"portable_gemv: 256 columns do not match weights \[8, 288\] of layout 3"):
        torch.ops.qwen35.portable_gemv(torch.randn(1, 256), w.qs, w.d, 3, True)
    with pytest.raises(RuntimeError, match="kind must be 1 \\(q8_0\\), 2 \\(q4_0\\), 3 \\(q4_k\\) or 4 \\(q6_k\\), got 7"):
        torch.ops.qwen35.portable_gemv(torch.randn(1, 512), w.qs, w.d, 7, True)
    q8 = QuantizedWeight.quantize("q8_0", torch.randn(8, 64))
    with pytest.raises(RuntimeError, match=r"d must be contiguous fp16 \[N, K/32\], got \[8, 1\]"):
        torch.ops.qwen35.portable_gemv(torch.randn(1, 64), q8.qs, q8.d[:, :1].contiguous(), 1, True)


@pytest.mark.parametrize("scheme", list(KIND))
def test_dequantize_writes_the_reference_bits(scheme):
    w = QuantizedWeight.quantize(scheme, awkward(13, 512, 4))
    big = torch.full((20, 512), 7.0, dtype=torch.bfloat16)  # into rows of a larger matrix, the others untouched
    torch.ops.qwen35.portable_dequant_bf16_out(w.qs, w.d, KIND[scheme], big[4:17])
    assert torch.equal(big[4:17], formats.dequantize(scheme, w.qs, w.d, torch.bfloat16))
    assert (big[:4] == 7).all() and (big[17:] == 7).all()
    with pytest.raises(RuntimeError, match=r"out must be contiguous bf16 \[13, K\], got \[12, 512\]"):
        torch.ops.qwen35.portable_dequant_bf16_out(w.qs, w.d, KIND[scheme], torch.empty(12, 512, dtype=torch.bfloat16))


def test_dequantize_rounds_non_finite_scales_as_torch_does():
    # a corrupted scale (inf, NaN) gives what torch's rounding of the reference gives
    w = QuantizedWeight.quantize("q8_0", torch.randn(3, 64, generator=torch.Generator().manual_seed(6)))
    d = w.d.clone()
    d[0, 0], d[1, 1], d[2, 0] = float("inf"), float("nan"), -float("inf")
    ref = formats.dequantize("q8_0", w.qs, d, torch.bfloat16)
    out = torch.empty(3, 64, dtype=torch.bfloat16)
    torch.ops.qwen35.portable_dequant_bf16_out(w.qs, d, 1, out)
    assert ref.isnan().any() and ref.isinf().any() and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.masked_fill(out.isnan(), 0), ref.masked_fill(ref.isnan(), 0))


@pytest.mark.parametrize("scheme", list(KIND))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantizers_write_the_reference_bytes(scheme, dtype):
    w = awkward(37, 768, 3).to(dtype)  # 111 super-blocks: q4_k's pairs end half-filled
    ref_qs, ref_d = formats.quantize(scheme, w)
    if scheme in formats.K_KIND:
        qs, d = torch.ops.qwen35.portable_quantize_k(w, KIND[scheme]), ref_d
    else:
        qs, d = torch.ops.qwen35.portable_quantize_weights(w, 8 if scheme == "q8_0" else 4)
    assert torch.equal(qs, ref_qs) and torch.equal(d, ref_d)


@pytest.mark.parametrize("quant,machine", [("q8_0", "portable"), ("int4", "portable"), ("int4", "none")])
def test_a_machine_without_avx512_runs_quantized_models_on_them(quant, machine, monkeypatch):
    """Where the AVX512 kernels cannot load, load_model quantizes with the portable quantizers (the same bytes as
    the AVX512 build) and binds the portable kernels to every quantized matrix; greedy answers of the bundled
    model (trained: real margins) equal those of the same quantized model on the reference path. machine: what
    prefill_gemm_machine finds, an AVX2 laptop ("portable": its integer GEMM for prefill) or a CPU without it
    ("none": prefill dequantizes)."""
    from qwen35.commands.common import default_model
    from qwen35.ops.fast import quantized_weights

    if machine == "portable" and not kernels.portable_gemm_vectorized():
        pytest.skip("the portable library has no AVX2 GEMM on this CPU")
    avx512, _ = qwen35.load(default_model(), dtype=torch.bfloat16, quant=quant, kernels=False)
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "this CPU lacks AVX512-BF16 or AVX512-VNNI")
    monkeypatch.setattr(qw, "_auto_gemm", [machine])
    gemm_calls = []
    real_gemm = torch.ops.qwen35.portable_gemm
    monkeypatch.setattr(torch.ops.qwen35, "portable_gemm", lambda *a: gemm_calls.append(a[0].shape[0]) or real_gemm(*a))
    model, tok = qwen35.load(default_model(), dtype=torch.bfloat16, quant=quant)  # kernel_policy: quantized
    objects = quantized_weights(model)
    assert objects and all(w.portable and not w.kernels for w in objects)
    report = fast.bind_kernels(model)
    assert not report.enabled and "quantized weights on the portable kernels" in report.reason
    assert sum(report.bound["portable_" + s] for s in KIND if "portable_" + s in report.bound) == len(objects)
    mixers = [m for m in model.modules() if hasattr(m, "delta_rule")]
    assert report.bound["portable_delta_rule"] == report.bound["portable_gdn_step"] == len(mixers)
    assert all(m.delta_rule is fast.portable_delta_rule and m.forward.kernel == "_portable_gdn_decode" for m in mixers)
    assert report.bound["portable_conv_silu"] == len(mixers)  # prefill's conv + SiLU
    assert all(m.conv_silu is fast._portable_conv_silu for m in mixers)
    mlps = [m for m in model.modules() if hasattr(m, "silu_mul")]
    assert report.bound["portable_silu_mul"] == len(mlps) and all(m.silu_mul is fast._portable_silu_mul for m in mlps)
    # and a decode step is one call of the portable library (kernels/portable_layers.cpp)
    layers = [m for m in model.modules() if hasattr(m, "post_attention_layernorm")]  # the MTP head's among them
    assert len(layers) > len(model.model.layers)
    assert report.bound["portable_gdn_layer"] + report.bound["portable_attn_layer"] == len(layers)
    assert report.bound["portable_decode_stack"] == 1 and model.decode_stack.portable
    for a, b in zip(objects, quantized_weights(avx512)):
        assert a.scheme == b.scheme and torch.equal(a.qs, b.qs) and torch.equal(a.d, b.d)
    ref, _ = qwen35.load(default_model(), dtype=torch.bfloat16, quant=quant, kernels=False)
    assert not any(w.portable or w.kernels for w in quantized_weights(ref))
    assert_same_greedy_answers(ref, model, tok)
    # the fourth prompt's prefill is longer than GEMV_CHUNK_MAX_ROWS: the GEMM took it where it runs
    assert bool(gemm_calls) == (machine == "portable")
    assert all(rows > qw.GEMV_CHUNK_MAX_ROWS for rows in gemm_calls)
    fast.bind_kernels(model, False)
    assert not any(w.portable for w in objects) and not any(m.delta_rule is fast.portable_delta_rule for m in mixers)
    assert not any("forward" in m.__dict__ for m in mixers)
    assert not any(m.conv_silu is fast._portable_conv_silu for m in mixers)
    assert not any(m.silu_mul is fast._portable_silu_mul for m in mlps)


@pytest.mark.skipif("QWEN35_PORTABLE_MARCH" in os.environ or platform.machine() not in ("x86_64", "AMD64"),
                    reason="checks other x86 builds from the default one")
@pytest.mark.parametrize("march,needs", [("x86-64-v3", {"avx2", "fma", "f16c", "bmi2"}), ("x86-64", set())])
def test_the_builds_for_other_instruction_sets(march, needs):
    """-march=native on the AVX512 machines tests run on compiles the AVX2 dot products, not what a laptop
    without AVX2 runs: the kernels built for an AVX2 laptop (x86-64-v3) and for any x86-64 (SSE2: the generic
    vector code) each pass this file's kernel tests, in a process of their own (one build per process)."""
    if not needs <= kernels.cpu_flags():
        pytest.skip(f"this CPU cannot run {march} code")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", __file__,
                          "-k", "not machine_without and not other_instruction_sets and not refuses_this_cpu"],
                         env={**os.environ, "QWEN35_PORTABLE_MARCH": march}, capture_output=True, text=True,
                         timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " skipped" not in out.stdout and " failed" not in out.stdout


def _delta_rule_forms():
    """The delta-rule kernel as each library builds it (kernels/delta_rule.h): the portable library's always,
    the AVX512 library's where this CPU runs it (its vectors and block length differ)."""
    return [fast.portable_delta_rule] + ([fast.delta_rule] if kernels.available() else [])


@pytest.mark.parametrize("B,T,H,Dk,Dv", [(1, 1, 4, 64, 64), (2, 1, 3, 128, 128), (1, 3, 2, 32, 96), (2, 4, 1, 128, 256),
                                         (2, 150, 2, 64, 32), (1, 21, 2, 16, 20)])
@pytest.mark.parametrize("given_state", [True, False])
def test_delta_rule_equals_the_reference(B, T, H, Dk, Dv, given_state):
    """Against the torch recurrence token by token, in fp32 whatever the inputs' dtype: one token, a few, many
    (150 = whole blocks and a remainder for either block length), columns past the last full vector (Dv 20),
    decays of -inf (a packed document's start: nothing carried over) at the
    first token and inside a block."""
    from qwen35.ops.gated_delta import recurrent_gated_delta_rule

    g = torch.Generator().manual_seed(B * T * H + Dk + Dv)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=g), dim=-1).bfloat16() * Dk**-0.5
    k = torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=g), dim=-1).bfloat16()
    v = torch.randn(B, T, H, Dv, generator=g).bfloat16()
    gate = -torch.rand(B, T, H, generator=g) * 3
    gate[0, 0, 0] = float("-inf")  # a reset (packed documents): nothing carried over
    gate[-1, T // 2, -1] = float("-inf")
    beta = torch.rand(B, T, H, generator=g)
    state = torch.randn(B, H, Dk, Dv, generator=g) if given_state else None
    before = None if state is None else state.clone()
    with torch.no_grad():
        o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, gate, beta, state)
        for form in _delta_rule_forms():
            o, s = form(q, k, v, gate, beta, state)
            assert o.dtype == s.dtype == torch.float32 and o.shape == o_ref.shape and s.shape == s_ref.shape
            # fp32 rounding of sums over Dk terms of size |S| ~ 1 (state) and |k|, |q| <= 1
            tol = 1e-5 * (1 + s_ref.abs().amax())
            assert (o - o_ref).abs().max() <= tol and (s - s_ref).abs().max() <= tol, form.__name__
            if before is not None:
                assert torch.equal(state, before)  # snapshots that share it stay valid


def test_delta_rule_of_no_tokens_passes_the_state_through():
    state = torch.randn(2, 3, 16, 8)
    for form in _delta_rule_forms():
        with torch.no_grad():
            o, s = form(*(torch.zeros(2, 0, 3, d) for d in (16, 16, 8)), torch.zeros(2, 0, 3), torch.zeros(2, 0, 3), state)
        assert o.shape == (2, 0, 3, 8) and torch.equal(s, state) and s.data_ptr() != state.data_ptr()


@pytest.mark.parametrize("name", ["portable_delta_rule", "delta_rule"])
def test_delta_rule_takes_the_kernel_unless_autograd_records(monkeypatch, name):
    """Where autograd does not record, every token count runs the kernel (faster than the chunked torch form at
    every length measured: fast.delta_rule); mode="chunk" still gets the chunked form; where it records (inputs
    that require grad, grad enabled) the dispatcher's own choice (chunked, the torch recurrence for up to 4
    tokens), whose backward exists."""
    from qwen35.ops import gated_delta

    if name == "delta_rule" and not kernels.available():
        pytest.skip(kernels.unavailable_reason() or "no AVX512 kernels here")
    form = getattr(fast, name)
    calls = []
    monkeypatch.setattr(gated_delta, "chunk_gated_delta_rule", lambda *a: calls.append("chunk") or "torch")
    monkeypatch.setattr(step_forms, "recurrent_gated_delta_rule", lambda *a: calls.append("recurrent") or "torch")
    kernel = getattr(torch.ops.qwen35, name)
    monkeypatch.setattr(torch.ops.qwen35, name, lambda *a: calls.append("kernel") or kernel(*a))
    q = torch.randn(1, 80, 2, 32)
    args = (q, q, torch.randn(1, 80, 2, 32), -torch.rand(1, 80, 2), torch.rand(1, 80, 2))
    with torch.no_grad():
        o, s = form(*args)  # 80 tokens: more than a chunk of 64
        assert o.shape == (1, 80, 2, 32) and s.shape == (1, 2, 32, 32)
        assert form(*args, mode="chunk") == "torch"
    with torch.enable_grad():
        assert form(*args)[0].shape == (1, 80, 2, 32)  # nothing requires grad: nothing to record
        tracked = (q.clone().requires_grad_(),) + args[1:]
        assert form(*tracked) == "torch"
        assert form(*[a[:, :1] for a in tracked]) == "torch"
    assert calls == ["kernel", "chunk", "kernel", "chunk", "recurrent"]
    with torch.no_grad(), pytest.raises(ValueError, match="unknown gated delta rule mode 'fast'"):
        form(*[a[:, :1] for a in args], mode="fast")


@pytest.mark.parametrize("name", ["portable_delta_rule", "delta_rule"])
def test_delta_rule_refuses_mismatched_shapes(name):
    if name == "delta_rule" and not kernels.available():
        pytest.skip(kernels.unavailable_reason() or "no AVX512 kernels here")
    op = getattr(torch.ops.qwen35, name)
    q = torch.randn(1, 1, 2, 32)
    with pytest.raises(RuntimeError, match=rf"{name}: state must be \[B, H, Dk, Dv\] = \[1, 2, 32, 32\], got \[1, 2, 32, 16\]"):
        op(q, q, q, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.zeros(1, 2, 32, 16))
    with pytest.raises(RuntimeError, match=rf"{name}: g and beta must be \[B, T, H\] = \[1, 1, 2\], got \[1, 2\]"):
        op(q, q, q, torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2, 32, 32))
    with pytest.raises(RuntimeError, match=rf"{name}: q, k must be \[B, T, H, Dk\] and v \[B, T, H, Dv\]"):
        op(q, q[..., :16], q, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.zeros(1, 2, 32, 32))


def gdn_layer(Hk: int, Hv: int, Dk: int, Dv: int, seed: int = 0):
    """A bf16 Gated DeltaNet with fused input projections and fp32 gate parameters, as load_model builds it."""
    from qwen35.config import ModelConfig
    from qwen35.model.deltanet import GatedDeltaNet
    from qwen35.ops.linear import fuse_linears
    from qwen35.shapes import text_config

    cfg = ModelConfig.from_hf(text_config("tiny", linear_num_key_heads=Hk, linear_num_value_heads=Hv,
                                          linear_key_head_dim=Dk, linear_value_head_dim=Dv))
    torch.manual_seed(seed)
    layer = GatedDeltaNet(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
        layer.A_log.copy_(torch.rand(Hv).log())
        layer.norm.weight.copy_(1 + 0.1 * torch.randn(Dv))
    layer = layer.bfloat16()
    layer.A_log.data, layer.dt_bias.data, layer.norm.weight.data = (
        layer.A_log.float(), layer.dt_bias.float(), layer.norm.weight.float())
    owner, attr, linears = layer.fusion_group()
    setattr(owner, attr, fuse_linears(*linears))
    return cfg, layer


# the last: 44 channels, not a multiple of 8 (the conv's scalar form), and Dv = 20 (the output gate's scalar tail)
@pytest.mark.parametrize("Hk,Hv,Dk,Dv", [(2, 4, 128, 128), (2, 2, 64, 96), (1, 3, 32, 48), (1, 1, 12, 20)])
def test_gdn_decode_step_equals_the_reference(Hk, Hv, Dk, Dv):
    from qwen35.cache import DeltaNetState

    cfg, layer = gdn_layer(Hk, Hv, Dk, Dv)
    torch.manual_seed(1)
    conv = torch.randn(2, layer.kernel_size - 1, layer.conv_dim).bfloat16()
    rec = torch.randn(2, Hv, Dk, Dv) * 0.1
    s_fast, s_ref = DeltaNetState(conv, rec), DeltaNetState(conv.clone(), rec.clone())
    rec_before, conv_before = rec.clone(), conv.clone()
    x = torch.randn(2, 1, cfg.hidden_size).bfloat16()
    with torch.inference_mode():
        out = fast._portable_gdn_decode(layer, x, s_fast)
        ref = layer(x, s_ref)  # the layer is unbound: the reference forward
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel(out, ref) <= 1e-2  # the AVX512 gdn_decode's bound (tests/test_kernels.py)
    assert torch.equal(s_fast.conv, s_ref.conv)
    assert rel(s_fast.recurrent, s_ref.recurrent) <= 1e-3
    assert torch.equal(rec, rec_before) and torch.equal(conv, conv_before)  # snapshots holding them stay valid


def test_gdn_decode_step_refuses_what_does_not_fit():
    _, layer = gdn_layer(2, 4, 64, 64)
    proj = torch.zeros(1, layer.conv_dim + layer.value_dim + 2 * 4).bfloat16()
    conv = torch.zeros(1, layer.kernel_size - 1, layer.conv_dim).bfloat16()
    args = (layer.conv1d.weight[:, 0].contiguous(), layer.A_log, layer.dt_bias)
    with pytest.raises(RuntimeError, match="portable_gdn_decode: sizes do not fit one layer"):
        torch.ops.qwen35.portable_gdn_decode(proj, conv, *args, torch.zeros(1, 4, 64, 32), layer.norm.weight, 2, 1e-6)
    with pytest.raises(RuntimeError, match="portable_gdn_decode: state, A_log, dt_bias and norm_w must be fp32"):
        torch.ops.qwen35.portable_gdn_decode(proj, conv, *args, torch.zeros(1, 4, 64, 64).bfloat16(), layer.norm.weight,
                                             2, 1e-6)


@pytest.mark.parametrize("B,T,C,K", [(1, 1, 96, 4), (2, 5, 96, 4), (2, 70, 104, 4), (1, 300, 64, 2), (3, 9, 24, 8),
                                     (1, 2, 16, 5)])
def test_conv_silu_equals_the_reference(B, T, C, K):
    """Prefill's causal conv + SiLU (T tokens, fewer than the taps too): the conv output is the reference's bit for
    bit (the same exact products summed in its order), so its SiLU differs from torch's by at most one bf16 step
    (the exponentials' last bits), and the state is the last K-1 inputs exactly."""
    from qwen35.ops.causal_conv import causal_conv1d

    g = torch.Generator().manual_seed(B * T * C + K)
    x = (torch.randn(B, T, C, generator=g) * 3).bfloat16()
    w, state = torch.randn(C, K, generator=g).bfloat16(), torch.randn(B, K - 1, C, generator=g).bfloat16()
    y, new_state = torch.ops.qwen35.portable_conv_silu(x, w, state)
    conv, ref_state = causal_conv1d(x, w, state)
    ref = torch.nn.functional.silu(conv)
    assert torch.equal(new_state, ref_state)
    step = ref.float().abs() * 2**-7  # one bf16 step at the reference's magnitude (8 significant bits)
    assert ((y.float() - ref.float()).abs() <= step).all()
    assert (y == ref).float().mean() > 0.99
    assert torch.equal(torch.ops.qwen35.portable_conv_silu(x, w, state)[0], y)  # the same bits each call


@pytest.mark.parametrize("shape", [(1, 1, 2 * 3584), (2, 70, 2 * 96), (3, 2 * 13), (1, 2)])
def test_silu_mul_equals_the_reference(shape):
    """The MLP's silu(gate) * up (decode rows, prefill chunks, widths that are no multiple of 8): torch's bf16
    roundings (silu, then the product), the exponentials' last bits aside: within one bf16 step, nearly all equal."""
    from qwen35.model.mlp import silu_mul

    g = torch.Generator().manual_seed(sum(shape))
    gate_up = (torch.randn(*shape, generator=g) * 4).bfloat16()
    out, ref = torch.ops.qwen35.portable_silu_mul(gate_up), silu_mul(gate_up)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all()
    assert (out == ref).float().mean() > 0.99


def test_conv_silu_reads_a_column_slice_and_names_what_does_not_fit():
    """Prefill hands it the qkv columns of the fused projection's output (rows at the wider stride): the same
    bits as a contiguous copy. Strided channels, channel counts not a multiple of 8, a state of another shape and
    other dtypes are refused by name."""
    wide = torch.randn(2, 37, 160).bfloat16()
    x = wide[..., 16:112]
    w, state = torch.randn(96, 4).bfloat16(), torch.randn(2, 3, 96).bfloat16()
    y, new_state = torch.ops.qwen35.portable_conv_silu(x, w, state)
    y_ref, state_ref = torch.ops.qwen35.portable_conv_silu(x.contiguous(), w, state)
    assert y.is_contiguous() and torch.equal(y, y_ref) and torch.equal(new_state, state_ref)
    with pytest.raises(RuntimeError, match="portable_conv_silu: x \\[B, T, C\\] with contiguous channels"):
        torch.ops.qwen35.portable_conv_silu(torch.randn(2, 37, 192).bfloat16()[..., ::2], w, state)
    with pytest.raises(RuntimeError, match=r"sizes do not fit: x \[2, 37, 92\], w \[92, 4\], state \[2, 3, 92\] "
                                           r"\(channels a multiple of 8, 2-8 taps\)"):
        torch.ops.qwen35.portable_conv_silu(x[..., :92], w[:92].contiguous(), state[..., :92].contiguous())
    with pytest.raises(RuntimeError, match="sizes do not fit"):
        torch.ops.qwen35.portable_conv_silu(x, w, state[:, :2].contiguous())
    with pytest.raises(RuntimeError, match="portable_conv_silu: x, w and state must be bf16"):
        torch.ops.qwen35.portable_conv_silu(x.float(), w, state)


@pytest.mark.parametrize("Hq,Hkv,D", [(8, 2, 256), (4, 4, 64), (6, 2, 40), (10, 2, 96)])
def test_attention_equals_the_reference(Hq, Hkv, D):
    """portable_attn_decode (the portable attention layer's kernel: blocks of 256 keys merged by their maxima) against
    ops/attention.decode_attention, the torch path's fp32 attention, row by row: rows of 1, 300 and 777 keys (one,
    two and four blocks) in buffers longer than they are, query groups of 4, 1 and 3. Both are fp32 sums of the bf16
    values, rounded once to bf16: at most one bf16 step apart, or fp32 noise where the output is near zero."""
    from qwen35.ops.attention import decode_attention

    g = torch.Generator().manual_seed(Hq * D)
    lengths = [1, 300, 777]
    q = torch.randn(len(lengths), Hq, D, generator=g).bfloat16()
    ks = [torch.randn(Hkv, n + 5, D, generator=g).bfloat16() * 3 for n in lengths]
    vs = [torch.randn(Hkv, n + 5, D, generator=g).bfloat16() for n in lengths]
    out = torch.ops.qwen35.portable_attn_decode(q, ks, vs, [], [], lengths, D**-0.5)
    for b, n in enumerate(lengths):
        ref = decode_attention(q[b : b + 1, :, None].float(), ks[b][None, :, :n].float(), vs[b][None, :, :n].float(),
                               D**-0.5)[0, :, 0]
        err = (out[b].float() - ref).abs()
        assert (err <= ref.abs() * 2**-8 + 1e-5 * vs[b].float().abs().max()).all(), err.max()


@pytest.mark.parametrize("Hq,Hkv,D", [(8, 2, 256), (6, 2, 64), (10, 2, 96), (4, 1, 128), (4, 2, 32)])
def test_attention_over_a_q8_0_cache_equals_the_reference(Hq, Hkv, D):
    """Over a q8_0 cache (int8 blocks of 32 and their fp16 scales, read in place) against the exact answer,
    kv_storage.attend_reference in fp32 over the same stored values. Built for AVX2 the kernel sums in 16-bit
    integers (queries put in int16 against their largest magnitude, probabilities times value scales against
    the block's largest scale: roundings of 2^-16 of the largest term); elsewhere in fp32. Either way its error
    must be that of rounding the exact answer to bf16 (its output's one rounding), within 5%, and under the bf16
    reference's (which reads the values back in bf16, as the torch decode path does: ~4x larger). Rows of 300, 1,
    520 and 2,000 keys (blocks of 256 and partial ones, an odd count), query groups of 4, 3, 5 (4 + 1), 4 and 2, one
    to eight blocks of 32 dimensions."""
    from qwen35.kv_storage import Q8KVBuffer, attend_reference

    g = torch.Generator().manual_seed(Hq + D)
    lengths = [300, 1, 520, 2000]
    q = torch.randn(len(lengths), Hq, D, generator=g).bfloat16()
    bufs = [Q8KVBuffer.from_values(torch.randn(Hkv, n + 3, D, generator=g) * 3, torch.randn(Hkv, n + 3, D, generator=g),
                                   torch.bfloat16) for n in lengths]
    out = torch.ops.qwen35.portable_attn_decode(q, [b.k for b in bufs], [b.v for b in bufs], [b.kd for b in bufs],
                                                [b.vd for b in bufs], lengths, D**-0.5)
    exact = attend_reference(q, bufs, lengths, D**-0.5, torch.float32)
    ref16 = attend_reference(q, bufs, lengths, D**-0.5, torch.bfloat16)
    e_kernel, e_round, e_ref16 = rel(out, exact), rel(exact.bfloat16(), exact), rel(ref16, exact)
    assert e_kernel <= 1.05 * e_round and e_kernel < e_ref16, (e_kernel, e_round, e_ref16)


@pytest.mark.parametrize("G,D", [(4, 256), (3, 96)])
def test_attention_over_a_q8_0_cache_at_the_largest_integer_sums(G, D):
    """The AVX2 form's P.V sums int16 weights (probability times value scale, at most 32767) times int8 values in
    int32 over a block of 256 keys: identical keys give every key probability 1 and values at +-127 of one scale
    make every term the largest there is (256 * 127 * 32767, under 2^31). The answer is the value row itself; a
    sum that wrapped, or a weight rounded past 32767 into int16's negatives, would not be. Then the scores at
    their largest: a query whose every element is +-its largest magnitude (all +-32767 in int16) against keys at
    +-127 of which one has the query's signs (every product the largest, and the clear winner) and one the
    opposite: within the output's rounding of the exact answer."""
    from qwen35.kv_storage import Q8KVBuffer, attend_reference

    buf, row, gen = largest_sums_cache(D)
    Hkv, n = buf.k.shape[0], buf.k.shape[1]
    q = torch.randn(1, G * Hkv, D, generator=gen).bfloat16()
    out = torch.ops.qwen35.portable_attn_decode(q, [buf.k], [buf.v], [buf.kd], [buf.vd], [n], D**-0.5)
    torch.testing.assert_close(out.float(), row.expand(1, G * Hkv, D), rtol=2**-8, atol=0)

    q = torch.where(torch.rand(1, G * Hkv, D, generator=gen) < 0.5, -2.0, 2.0).bfloat16()
    keys = torch.where(torch.rand(Hkv, n, D, generator=gen) < 0.5, -1.0, 1.0)
    keys[:, 7] = q[0, ::G].float().sign()
    keys[:, 8] = -keys[:, 7]
    buf = Q8KVBuffer.from_values(keys, torch.randn(Hkv, n, D, generator=gen), torch.bfloat16)
    out = torch.ops.qwen35.portable_attn_decode(q, [buf.k], [buf.v], [buf.kd], [buf.vd], [n], 0.3)
    exact = attend_reference(q, [buf], [n], 0.3, torch.float32)
    assert rel(out, exact) <= 1.05 * rel(exact.bfloat16(), exact), (rel(out, exact), rel(exact.bfloat16(), exact))
    assert rel(out[0, ::G], buf.read(n, torch.float32)[1][:, 7]) < 0.01  # the winner's value, nearly alone


def test_attention_names_bad_buffers():
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    k = torch.zeros(2, 10, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="row 0's buffers"):
        torch.ops.qwen35.portable_attn_decode(q, [k], [k], [], [], [11], 0.125)  # more keys than the buffer holds
    k3 = torch.zeros(3, 10, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="4 query heads over 3 KV heads"):
        torch.ops.qwen35.portable_attn_decode(q, [k3], [k3], [], [], [5], 0.125)
    with pytest.raises(RuntimeError, match="row 0's q8_0 scales"):
        k8 = torch.zeros(2, 10, 64, dtype=torch.int8)
        torch.ops.qwen35.portable_attn_decode(q, [k8], [k8], [torch.zeros(2, 10, 1).half()], [torch.zeros(2, 10, 2).half()],
                                              [5], 0.125)


def test_top_k_rows_is_a_stable_sort():
    """portable_top_k_rows (topk_kernels.cpp in the portable library: 8-wide compares in vector code where the build
    has no AVX512, as on an AVX2 laptop; this file runs again for such builds) against a stable descending sort:
    equal values by ascending id, -inf and inf in place, k up to 64; a row holding a NaN is reported, not ranked."""
    gen = torch.Generator().manual_seed(5)
    for trial in range(60):
        V = (248320, 4100, 37, 9)[trial % 4]
        x = torch.randint(-6, 6, (3, V), generator=gen).float() if trial % 2 else torch.randn(3, V, generator=gen)
        if trial % 3 == 0:
            x[1, torch.randint(0, V, (V // 3,), generator=gen)] = float("-inf")
        if trial % 5 == 0:
            x[2, torch.randint(0, V, (2,), generator=gen)] = float("inf")
        k = min(V, (1, 2, 21, 64)[trial % 4])
        vals, ids, ok = torch.ops.qwen35.portable_top_k_rows(x, k)
        ref_vals, ref_ids = x.sort(dim=-1, descending=True, stable=True)
        assert bool(ok.all()) and torch.equal(vals, ref_vals[:, :k]) and torch.equal(ids, ref_ids[:, :k]), (trial, V, k)
    x = torch.randn(2, 4100, generator=gen)
    x[1, 4099] = float("nan")  # in the scalar tail
    x[0, 17] = float("nan")  # in the vector loop
    assert not torch.ops.qwen35.portable_top_k_rows(x, 3)[2].any()
    with pytest.raises(RuntimeError, match="portable_top_k_rows: k must be in"):
        torch.ops.qwen35.portable_top_k_rows(x, 0)


@pytest.mark.skipif("QWEN35_PORTABLE_MARCH" in os.environ or platform.machine() not in ("x86_64", "AMD64"),
                    reason="replaces the default build's target")
def test_a_compiler_that_refuses_this_cpu_builds_the_baseline(tmp_path):
    """Where the compiler refuses the CPU target (an older clang and -mcpu=native), the library is built for the
    architecture's baseline and says so, instead of leaving quantized weights to the reference: here a target no
    compiler knows, in a process of its own; the baseline x86-64 build has no AVX2 GEMM."""
    script = ("import sys, torch\n"
              "from qwen35.ops import kernels\n"
              "kernels._portable_target = lambda: ['-march=no-such-cpu']\n"
              "print(kernels.portable_available(), torch.ops.qwen35.portable_gemm_vectorized())\n")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "QWEN35_KERNELS": "portable"},
                         capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0 and out.stdout.split() == ["True", "False"], out.stdout + out.stderr[-3000:]
    assert "qwen35: portable kernels built for the architecture's baseline, not this CPU (" in out.stderr
    assert "no-such-cpu" in out.stderr.split("baseline, not this CPU (")[1], out.stderr[-3000:]
