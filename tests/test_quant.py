"""Quantized weights: GGUF-exact layouts, kernels against the reference they replace, policies, and
models that load quantized and generate the same tokens through the kernels as through the reference."""

import numpy as np
import pytest
import torch

import qwen35
from qwen35.commands.replica import build_replica
from qwen35.ops import kernels
from qwen35.ops.fast import bind_kernels, quantized_weights
from qwen35.quant import QuantError, QuantizedWeight, formats, policy

from greedy_ties import assert_same_greedy_answers

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")
SCHEMES = ["q8_0", "q4_0"]


def gguf_bytes(scheme, qs, d):
    """Our (qs, d) as GGUF's interleaved blocks: per block, fp16 d then its bytes."""
    lay = formats.layout(scheme)
    N = qs.shape[0]
    q = qs.view(torch.uint8).reshape(N, -1, lay.qs_cols).numpy()
    dd = d.reshape(N, -1, 1).numpy().view(np.uint8).reshape(N, -1, 2)
    return np.concatenate([dd, q], axis=-1).reshape(N, -1)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layouts_are_ggufs_bit_for_bit(scheme):
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 96, generator=g) * torch.rand(37, 1, generator=g) * 3
    w[0, :32] = 0  # an all-zero block: scale 0
    w[1, 5] = -w[1, :32].abs().max() * 2  # the extreme value negative
    qs, d = formats.quantize(scheme, w)
    ref = quants.quantize(w.numpy(), getattr(GGMLQuantizationType, scheme.upper()))
    assert np.array_equal(gguf_bytes(scheme, qs, d), ref)
    deq = quants.dequantize(ref, getattr(GGMLQuantizationType, scheme.upper()))
    assert np.array_equal(formats.dequantize(scheme, qs, d).numpy(), deq)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pack_unpack_round_trip_is_exact(scheme):
    """Dequantized weights quantize back to the very same bytes and scales."""
    w = torch.randn(20, 64, generator=torch.Generator().manual_seed(1))
    qs, d = formats.quantize(scheme, w)
    qs2, d2 = formats.quantize(scheme, formats.dequantize(scheme, qs, d))
    assert torch.equal(qs, qs2) and torch.equal(d, d2)


def test_matrices_that_do_not_block_are_kept_or_refused():
    assert policy.scheme_for("int4", "model.layers.0.mlp.up_proj.weight", (64, 48), tied=True) is None
    with pytest.raises(QuantError, match=r"cannot block-quantize a \[64, 48\] matrix: K must be a multiple of 32"):
        QuantizedWeight.quantize("q8_0", torch.randn(64, 48))
    with pytest.raises(QuantError, match="unknown quantization 'gptq': use one of int8, int4, q8_0, q4_0, q4_k, q6_k"):
        policy.scheme_for("gptq", "lm_head.weight", (64, 64), tied=False)


def test_policy_keeps_the_recurrent_path_high():
    keep = ["model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.dt_bias",
            "model.layers.0.linear_attn.conv1d.weight", "model.layers.0.linear_attn.norm.weight",
            "model.layers.3.self_attn.q_norm.weight", "model.norm.weight"]
    for name in keep:
        assert policy.scheme_for("q4_0", name, (128, 64), tied=True) is None, name
    assert policy.scheme_for("int4", "model.layers.0.linear_attn.in_proj_a.weight", (16, 64), True) == "q8_0"
    assert policy.scheme_for("int4", "model.embed_tokens.weight", (320, 64), tied=True) == "q8_0"  # q6_k's fallback
    assert policy.scheme_for("int4", "model.embed_tokens.weight", (320, 256), tied=True) == "q6_k"
    assert policy.scheme_for("int4", "model.embed_tokens.weight", (320, 64), tied=False) is None
    assert policy.scheme_for("int8", "model.layers.0.mlp.down_proj.weight", (64, 128), True) == "q8_0"


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M,N,K", [(1, 100, 64), (3, 77, 96), (8, 130, 1024), (2, 33, 32), (5, 17, 544)])
def test_gemv_kernels_equal_the_reference(scheme, M, N, K):
    """Odd N, a single block, block counts that are not a multiple of the kernels' groups of 2, 4 and 16."""
    g = torch.Generator().manual_seed(M * N + K)
    w = QuantizedWeight.quantize(scheme, torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g).bfloat16()
    op = torch.ops.qwen35.gemv_q8_0 if scheme == "q8_0" else torch.ops.qwen35.gemv_q4_0
    out = op(x, w.qs, w.d, True)
    ref = formats.reference_matmul(scheme, x, w.qs, w.d)
    # the same products summed in another order: bound by fp32 rounding of the sum of |terms|
    xq, dx = formats.quantize_activations(x)
    xs = (xq.float().reshape(M, -1, 32) * dx[..., None]).reshape(M, K)
    bound = 1e-6 * (xs.abs() @ formats.dequantize(scheme, w.qs, w.d).abs().t()) + 1e-6
    assert ((out - ref).abs() <= bound).all()
    assert torch.equal(op(x, w.qs, w.d, False), out.bfloat16())


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("K", [160, 544, 1024])  # 5, 17 and 32 blocks: the kernel takes scales 16 blocks at a time
def test_dequantize_kernel_equals_the_reference(scheme, K):
    w = QuantizedWeight.quantize(scheme, torch.randn(40, K, generator=torch.Generator().manual_seed(2)))
    bits = 8 if scheme == "q8_0" else 4
    assert torch.equal(torch.ops.qwen35.dequant_bf16(w.qs, w.d, bits),
                       formats.dequantize(scheme, w.qs, w.d, torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_k", "q6_k"])
def test_embedding_rows_with_kernels_are_the_reference_rows(scheme):
    """QuantizedWeight.rows (a quantized embedding's lookup, once per decode step) takes the dequantizing kernels
    when they are bound: the same bits as the reference's rows, in the ids' shape, repeats and bf16 included;
    other dtypes stay on the reference."""
    w = QuantizedWeight.quantize(scheme, torch.randn(50, 512, generator=torch.Generator().manual_seed(4)))
    ids = torch.tensor([[3, 49, 0], [3, 7, 12]])
    ref = formats.dequantize(scheme, w.qs[ids.reshape(-1)], w.d[ids.reshape(-1)], torch.bfloat16).view(2, 3, 512)
    w.kernels = True
    got = w.rows(ids, torch.bfloat16)
    assert got.shape == (2, 3, 512) and torch.equal(got, ref)
    ref32 = formats.dequantize(scheme, w.qs[ids.reshape(-1)], w.d[ids.reshape(-1)], torch.float32).view(2, 3, 512)
    assert torch.equal(w.rows(ids, torch.float32), ref32)


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantize_kernel_writes_into_a_row_block(scheme):
    """dequant_bf16_out: straight into rows of a larger matrix (a stacked projection's), the rows around it
    untouched; a wrong destination is refused with its shape named."""
    w = QuantizedWeight.quantize(scheme, torch.randn(24, 544, generator=torch.Generator().manual_seed(3)))
    bits = 8 if scheme == "q8_0" else 4
    big = torch.full((40, 544), 7.0, dtype=torch.bfloat16)
    torch.ops.qwen35.dequant_bf16_out(w.qs, w.d, bits, big[10:34])
    assert torch.equal(big[10:34], formats.dequantize(scheme, w.qs, w.d, torch.bfloat16))
    assert (big[:10] == 7).all() and (big[34:] == 7).all()
    with pytest.raises(RuntimeError, match=r"out must be contiguous bf16 \[24, 544\], got \[24, 512\]"):
        torch.ops.qwen35.dequant_bf16_out(w.qs, w.d, bits, torch.empty(24, 512, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="out must be contiguous bf16"):
        torch.ops.qwen35.dequant_bf16_out(w.qs, w.d, bits, torch.empty(24, 544))


@needs_kernels
def test_stacked_weight_prefill_is_one_gemm_on_the_stacked_matrix(monkeypatch):
    """A fused projection whose parts differ (int4's q4_k/q6_k rows with q8_0 gates, or bf16 rows): prefill
    dequantizes the parts into one matrix and runs one GEMM (no GEMM per part, no concatenated outputs); its
    result is the GEMM on the reference dequantization, and kept once inside dequantized_once. With the
    integer prefill GEMM each part runs its own (nothing to dequantize). (The AMX panel kernel, which takes a
    few hundred rows part by part without dequantizing any whole: test_amx_panels.py.)"""
    from qwen35.ops.linear import StackedWeight
    from qwen35.quant import weight as qw
    from qwen35.quant.weight import dequantized_once

    monkeypatch.setattr(qw, "PREFILL_GEMM", "dequantize")
    monkeypatch.setattr(qw, "USE_PANELS", False)

    g = torch.Generator().manual_seed(5)
    parts = [QuantizedWeight.quantize("q4_k", torch.randn(64, 512, generator=g)),
             QuantizedWeight.quantize("q8_0", torch.randn(16, 512, generator=g)),
             torch.randn(8, 512, generator=g).bfloat16()]
    for p in parts[:2]:
        p.kernels = True
    w = StackedWeight(parts)
    dense = torch.cat([formats.dequantize(p.scheme, p.qs, p.d, torch.bfloat16) for p in parts[:2]] + [parts[2]])
    x = torch.randn(20, 512, generator=g).bfloat16()
    with torch.no_grad():
        assert torch.equal(w._dense(), dense)
        assert torch.equal(w.matmul(x, False), torch.nn.functional.linear(x, dense))
        assert torch.equal(w.matmul(x, True), torch.nn.functional.linear(x, dense).float())
        per_part = torch.cat([p.matmul(x, True) if isinstance(p, QuantizedWeight) else x.float() @ p.float().t()
                              for p in parts], -1)
        assert torch.allclose(w.matmul(x, True), per_part, rtol=2e-2, atol=2e-1)
        with dequantized_once(dense.numel() * 2):
            y = w.matmul(x, False)
            from qwen35.quant import weight as qw

            assert len(qw._once.memo) == 1 and torch.equal(y, torch.nn.functional.linear(x, dense))
        decode = w.matmul(x[:3], False)  # a few rows: each part's GEMV, then concatenated
        assert torch.equal(decode, torch.cat([parts[0].matmul(x[:3], False), parts[1].matmul(x[:3], False),
                                              torch.nn.functional.linear(x[:3], parts[2])], -1))
        monkeypatch.setattr(qw, "PREFILL_GEMM", "integer")
        assert torch.equal(w.matmul(x, False), torch.cat([parts[0].matmul(x, False), parts[1].matmul(x, False),
                                                          torch.nn.functional.linear(x, parts[2])], -1))


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_kernel_writes_the_reference_bytes(scheme, dtype):
    g = torch.Generator().manual_seed(8)
    w = (torch.randn(70, 160, generator=g) * torch.rand(70, 1, generator=g) * 4).to(dtype)
    w[0, :32] = 0
    w[1, 3] = -w[1, :32].abs().max() * 3
    w[2, 40] = w[2, 32:64].abs().max() * 2  # ties and extremes of either sign
    w[2, 41] = -w[2, 40]
    qs, d = torch.ops.qwen35.quantize_weights(w, 8 if scheme == "q8_0" else 4)
    ref_qs, ref_d = formats.quantize(scheme, w)
    assert torch.equal(qs, ref_qs) and torch.equal(d, ref_d)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qtiny") / "tiny"
    build_replica(d, "tiny", seed=7)
    return d


def kl(ref_logits, logits):
    lp, lq = ref_logits.log_softmax(-1), logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


@pytest.mark.parametrize("quant,limit", [("q8_0", 2e-3), ("int4", 5e-2)])
def test_quantized_replica_stays_close_to_bf16(tiny_dir, quant, limit):
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(3))
    ref = qwen35.load_model(tiny_dir, dtype=torch.float32, kernels=False)
    q = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant=quant, kernels=False)
    with torch.no_grad():
        r, out = ref(ids), q(ids)
    assert kl(r, out) <= limit
    sizes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    plan = policy.plan(quant, sizes, ref.config.tie_word_embeddings)
    assert plan and all(isinstance(_weight(q, n), QuantizedWeight) for n in plan)


def _weight(model, name):
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr)


@needs_kernels
@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("M, N", [(1, 40), (6, 100), (37, 64)])  # tails of the 4-row tiles and 32-row panels
def test_integer_gemm_equals_the_reference(scheme, M, N):
    """gemm_quant (the prefill GEMM where bf16 has no AMX): formats.reference_matmul up to the order of its fp32
    roundings (the integer block sums are exact), bf16 output its fp32 output rounded, fp32 inputs alike."""
    g = torch.Generator().manual_seed(M * N)
    # 32-blocks: 3 (fewer than a group of 8, packed one by one) or 11 (a group, then 3); 2 super-blocks of 256
    for K in ((96, 352) if scheme in ("q8_0", "q4_0") else (512,)):
        _integer_gemm_check(scheme, M, N, K, g)


def _integer_gemm_check(scheme, M, N, K, g):
    w = QuantizedWeight.quantize(scheme, torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 3)
    x = torch.randn(M, K, generator=g).bfloat16()
    kind = {"q8_0": 1, "q4_0": 2, "q4_k": 3, "q6_k": 4}[scheme]
    y = torch.ops.qwen35.gemm_quant(x, w.qs, w.d, kind, True)
    ref = formats.reference_matmul(scheme, x, w.qs, w.d)
    assert y.shape == (M, N) and torch.allclose(y, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    assert torch.equal(torch.ops.qwen35.gemm_quant(x, w.qs, w.d, kind, False), y.bfloat16())
    assert torch.equal(torch.ops.qwen35.gemm_quant(x.float(), w.qs, w.d, kind, True), y)
    with pytest.raises(RuntimeError, match="gemm_quant: x has 64 columns"):
        torch.ops.qwen35.gemm_quant(x[:, :64].contiguous(), w.qs, w.d, kind, True)


@needs_kernels
@pytest.mark.parametrize("scheme, machine, rows, n, op", [
    ("q8_0", "integer", 9, 256, "gemm_quant"), ("q4_0", "integer", 16, 300, "gemm_quant"),
    ("q8_0", "integer", 8, 256, "gemv_q8_0"), ("q8_0", "integer", 16, 32, "gemv_q8_0"),
    ("q8_0", "amx", 16, 256, "gemv_q8_0"), ("q4_k", "integer", 16, 256, "gemv_q4_k"),
    ("q4_k", "integer", 17, 48, "gemm_quant")])
def test_short_prompts_take_the_gemm_or_gemvs_by_layout_and_machine(monkeypatch, scheme, machine, rows, n, op):
    """Past 8 rows q8_0 and q4_0 run the integer GEMM (its unpacking made it faster than GEMVs of 8 from 9 rows
    on, Zen 4), except where oneDNN has AMX and for matrices of fewer than 256 rows (a panel of 32 is the GEMM's
    unit of threads); the K-quants run GEMVs of 8 up to GEMV_CHUNK_MAX_ROWS (measured faster in the int4
    model). Each computes the reference's rule: the same output to fp32 rounding."""
    from qwen35.quant import weight as qw

    monkeypatch.setattr(qw, "_auto_gemm", [machine])
    monkeypatch.setattr(qw, "USE_PANELS", False)
    monkeypatch.delenv("QWEN35_QUANT_GEMM", raising=False)
    g = torch.Generator().manual_seed(rows)
    w = QuantizedWeight.quantize(scheme, torch.randn(n, 512, generator=g))
    w.kernels = True
    x = torch.randn(rows, 512, generator=g).bfloat16()
    calls = []
    for name in ("gemm_quant", qw.GEMV_OPS[scheme]):
        real = getattr(torch.ops.qwen35, name)
        monkeypatch.setattr(torch.ops.qwen35, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    with torch.no_grad():
        y = w.matmul(x, True)
    assert set(calls) == {op}, calls
    ref = formats.reference_matmul(scheme, x, w.qs, w.d)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@needs_kernels
def test_prefill_gemm_follows_the_machine_and_its_overrides(monkeypatch):
    from qwen35.ops import kernels as K
    from qwen35.quant import weight as qw

    def auto(flags, rows, cap=None):
        monkeypatch.setattr(qw, "_auto_gemm", [])
        monkeypatch.setattr(K, "cpu_flags", lambda: flags)
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        return qw.prefill_gemm(rows)

    monkeypatch.delenv("QWEN35_QUANT_GEMM", raising=False)
    amx = {"avx512_vnni", "amx_bf16"}
    monkeypatch.setattr(qw, "USE_PANELS", True)  # the AMX panel kernel: dequantizing from 17 rows on
    assert auto(amx, qw.GEMV_CHUNK_MAX_ROWS + 1) == "dequantize"
    assert auto(amx, qw.GEMV_CHUNK_MAX_ROWS) == "integer"  # GEMVs of 8
    assert qw.prefill_gemm(qw.GEMV_CHUNK_MAX_ROWS + 1, "q4_k") == "dequantize"
    monkeypatch.setattr(qw, "USE_PANELS", False)  # without it, the integer GEMM up to AMX_INTEGER_MAX_ROWS
    big = qw.AMX_INTEGER_MAX_ROWS["q8_0"] + 1
    assert auto(amx, big) == "dequantize"  # AMX tiles: dequantize + oneDNN's GEMM for long chunks
    assert auto(amx, big - 1) == "integer"  # and the integer GEMM for short ones
    assert qw.prefill_gemm(big - 1, "q4_k") == "dequantize"  # the K-quants' unpacking costs more: fewer rows
    assert qw.prefill_gemm(qw.AMX_INTEGER_MAX_ROWS["q4_k"], "q4_k") == "integer"
    assert auto(amx, big, "AVX10_1_512_AMX") == "dequantize"
    assert auto(amx, big, "AVX512_CORE_BF16") == "integer"  # oneDNN capped below AMX
    assert auto({"avx512_vnni", "avx512_bf16"}, 4096) == "integer"  # Zen 4
    monkeypatch.setattr(K, "available", lambda: False)  # a laptop: the portable library
    monkeypatch.setattr(K, "portable_gemm_vectorized", lambda: True)  # with its AVX2 GEMM
    assert auto({"avx2"}, qw.GEMV_CHUNK_MAX_ROWS) == "integer" and qw.prefill_gemm_machine() == "portable"
    assert all(qw.prefill_gemm(rows, s) == "integer" for rows in (17, 4096) for s in ("q8_0", "q4_0", "q4_k", "q6_k"))
    monkeypatch.setattr(K, "portable_gemm_vectorized", lambda: False)  # ARM, x86 without AVX2: GEMVs only
    assert auto(set(), 17) == "dequantize" and qw.prefill_gemm_machine() == "none"
    assert qw.prefill_gemm(4096, "q4_k") == "dequantize" and qw.prefill_gemm(8, "q4_k") == "dequantize"
    monkeypatch.setenv("QWEN35_QUANT_GEMM", "dequantize")
    assert qw.prefill_gemm(20) == "dequantize"
    monkeypatch.setenv("QWEN35_QUANT_GEMM", "int")
    with pytest.raises(ValueError, match="QWEN35_QUANT_GEMM='int': expected 'integer' or 'dequantize'"):
        qw.prefill_gemm(20)


@needs_kernels
@pytest.mark.parametrize("gemm", ["dequantize", "integer"])
def test_weight_prefill_paths_compute_what_their_reference_does(monkeypatch, gemm):
    """A weight object's many-row product, kernels against reference, under either prefill GEMM: "integer" is
    reference_matmul (inputs quantized), "dequantize" a GEMM on the dequantized weights."""
    from qwen35.quant import weight as qw

    monkeypatch.setattr(qw, "PREFILL_GEMM", gemm)
    g = torch.Generator().manual_seed(11)
    w = QuantizedWeight.quantize("q4_k", torch.randn(72, 512, generator=g))
    x = torch.randn(20, 512, generator=g).bfloat16()
    with torch.no_grad():
        ref = w.matmul(x, True)
        w.kernels = True
        fast = w.matmul(x, True)
        if gemm == "integer":  # 9-16 rows: GEMVs of 8 rows, the same rule
            assert torch.allclose(w.matmul(x[:13], True), ref[:13], rtol=1e-5, atol=1e-4)
    exact = (formats.reference_matmul("q4_k", x, w.qs, w.d) if gemm == "integer"
             else x.float() @ formats.dequantize("q4_k", w.qs, w.d).t())
    assert torch.allclose(fast, exact, rtol=2e-2, atol=2e-1) and torch.allclose(ref, exact, rtol=2e-2, atol=2e-1)
    if gemm == "integer":  # fp32 sums in two orders
        assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-4)
    elif qw.panels():  # the AMX panel kernel: the reference's bf16 weights, its fp32 sums in another order, so
        # the same bf16 result within one rounding step
        assert ((fast - ref).abs() <= ref.abs() * 2**-8).all() and not torch.equal(fast, exact)
    else:  # the dequantizing kernel writes the reference's bf16 weights: the same GEMM
        assert torch.equal(fast, ref)


@needs_kernels
@pytest.mark.parametrize("gemm", ["dequantize", "integer"])
@pytest.mark.parametrize("quant", ["q8_0", "int4"])
def test_kernels_and_reference_generate_the_same_tokens(quant, gemm, monkeypatch):
    """The bundled model (trained: its next-token margins are real), quantized: greedy answers through the
    VNNI kernels equal those of the same quantized model with its quantized matmuls on the reference (the
    rest bound alike), with either prefill GEMM (quant/weight.prefill_gemm: the machine picks one, the test
    forces each). Random replicas are no good here: their near-flat distributions turn the last-bit
    differences of another summation order into other tokens, through the per-block input quantization."""
    from qwen35.commands.common import default_model
    from qwen35.quant import weight as qw

    monkeypatch.setattr(qw, "PREFILL_GEMM", gemm)

    fast, tok = qwen35.load(default_model(), dtype=torch.bfloat16, quant=quant, kernels=True)
    slow, _ = qwen35.load(default_model(), dtype=torch.bfloat16, quant=quant, kernels=True)
    report = bind_kernels(fast, True)  # the bundled model is below kernel_policy's size: bound by hand
    assert report.bound.get("gdn_layer") and report.bound.get("attn_layer"), report  # quantized layers whole
    bind_kernels(slow, True, quantized=False)
    objects = quantized_weights(slow)
    assert objects and not any(w.kernels for w in objects)
    assert "gdn_layer" not in bind_kernels(slow, True, quantized=False).bound
    assert_same_greedy_answers(slow, fast, tok)



@needs_kernels
@pytest.mark.parametrize("quant", ["q8_0", "int4"])
def test_quantized_batch_and_snapshots_equal_each_alone(tiny_dir, quant):
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant=quant, kernels=True)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 4096, (n,), generator=gen).tolist() for n in (30, 7, 50)]
    params = qwen35.SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(-1,))
    alone = [[r.token for r in qwen35.generate_step(model, p, params=params)] for p in prompts]
    assert [[r.token for r in out] for out in qwen35.batch_generate(model, prompts, params)] == alone
    # Restoring a snapshot lands exactly where it was taken: the same tokens as a cache that never left it.
    # (Compared with the same 20 + 30 prefill split, not with the 50-token prefill above: a bf16 GEMM over 20
    # and 30 rows rounds differently from one over 50 on AMX machines, and a random model's near-ties flip.)
    def split_cache():
        c = model.make_cache()
        qwen35.generation.prefill(model, torch.tensor([prompts[2][:20]]), c)
        return c

    expected = [r.token for r in qwen35.generate_step(model, prompts[2][20:], cache=split_cache(), params=params)]
    cache = split_cache()
    snap = cache.snapshot()
    list(qwen35.generate_step(model, [1, 2, 3], cache=cache, params=params))
    cache.restore(snap)
    assert [r.token for r in qwen35.generate_step(model, prompts[2][20:], cache=cache, params=params)] == expected


@needs_kernels
@pytest.mark.parametrize("quant", ["q8_0", "int4"])
@pytest.mark.parametrize("whole_layers", [True, False])
def test_quantized_decode_error_is_that_of_the_reference_path(tiny_dir, quant, whole_layers):
    """Kernels on (whole-layer decode kernels, or per op) vs the pure torch reference of the same quantized
    model, both against fp32 dequantized weights run in fp32: the kernels' error is no larger than the
    reference path's own."""
    from test_kernels import bf16_error, decode_logits

    fast = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant=quant, kernels=False)
    report = bind_kernels(fast, True, whole_layers=whole_layers)
    layers = {k for k in report.bound if k.endswith(("_layer", "_step"))}
    assert layers == ({"gdn_layer", "attn_layer"} if whole_layers else {"gdn_step", "attn_step"}), report
    slow = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant=quant, kernels=False)
    exact = qwen35.load_model(tiny_dir, dtype=torch.float32, quant=quant, kernels=False)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 4096, (n,), generator=gen) for n in (40, 9)]
    ref = decode_logits(exact, prompts, 4)
    e_fast, e_slow = bf16_error(decode_logits(fast, prompts, 4), ref), bf16_error(decode_logits(slow, prompts, 4), ref)
    assert e_fast <= 1.25 * e_slow + 1e-3, (e_fast, e_slow)


def test_quantize_command_output_reloads_bit_identically(tiny_dir, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "qwen35", "quantize", str(tiny_dir), str(out), "--quant", "int4"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qwen35" and cfg["policy"] == "int4"
    assert set(cfg["tensors"].values()) == {"q4_k", "q6_k", "q8_0"}
    direct = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant="int4", kernels=False)
    again = qwen35.load_model(out, dtype=torch.bfloat16, kernels=False)
    assert again.quant == "int4"
    for name in cfg["tensors"]:
        a, b = _weight(direct, name), _weight(again, name)
        assert torch.equal(a.qs, b.qs) and torch.equal(a.d, b.d), name
    ids = torch.randint(0, 4096, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(direct(ids), again(ids))


def _with_a_truncated_matrix(out, bad):
    """A copy of quantized checkpoint `out` at `bad` whose layer-0 down_proj has lost its last 32 columns of
    packed values; returns (bad, the corrupted tensor's key)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(out, bad)
    shard = next(bad.glob("*.safetensors"))
    t = load_file(shard)
    key = "model.layers.0.mlp.down_proj.weight.qs"
    t[key] = t[key][:, :-32].contiguous()
    save_file(t, str(shard))
    return bad, key


def test_bad_quantized_checkpoints_are_clear_errors(tiny_dir, tmp_path):
    import json
    import shutil

    from qwen35.errors import CheckpointError
    from qwen35.quant.checkpoint import save_quantized

    out = save_quantized(qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant="q8_0", kernels=False),
                         tiny_dir, tmp_path / "q")
    with pytest.raises(CheckpointError, match=r"already quantized \(q8_0\); load it without quant="):
        qwen35.load_model(out, quant="int4")
    bad, key = _with_a_truncated_matrix(out, tmp_path / "bad")
    with pytest.raises(CheckpointError, match=rf"quantized tensor '{key}' does not match q8_0 for a \[\d+, \d+\] "
                                              r"matrix: expected int8 \[\d+, \d+\], found int8"):
        qwen35.load_model(bad)
    gptq = tmp_path / "gptq"
    shutil.copytree(tiny_dir, gptq)
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization_config.quant_method 'gptq' is not supported"):
        qwen35.load_model(gptq)


@needs_kernels
def test_quantized_mtp_head_drafts_like_its_reference():
    """The MTP head is quantized with the rest (its fc and its decoder layer) and its decode steps run the
    whole-layer kernels: drafted tokens along a text equal those of the same quantized head on the
    reference matmuls, token by token through its own cache."""
    from qwen35.commands.common import default_model

    fast, tok = qwen35.load(default_model(), dtype=torch.bfloat16, quant="int4", kernels=True)
    slow, _ = qwen35.load(default_model(), dtype=torch.bfloat16, quant="int4", kernels=True)
    assert "attn_layer" in bind_kernels(fast, True).bound
    bind_kernels(slow, True, quantized=False)
    assert isinstance(fast.mtp.fc.weight, QuantizedWeight)
    assert fast.mtp.layers[0].forward.kernel == "attn_layer_decode"
    ids = torch.tensor([tok.encode("import os\n\n\ndef main(argv):\n    for name in os.listdir(argv[1]):\n")])

    def drafts(model):
        with torch.no_grad():
            hidden = model.hidden_states(ids)
            cache, out = model.make_mtp_cache(), []
            for t in range(ids.shape[1] - 1):
                logits, _ = model.mtp_forward(hidden[:, t : t + 1], ids[:, t + 1 : t + 2], cache)
                out.append(int(logits[0, -1].argmax()))
        return out

    assert drafts(fast) == drafts(slow)


def test_checkpoint_tensors_reads_a_quantized_checkpoint_as_its_dequantized_weights(tiny_dir, tmp_path):
    """weights.CheckpointTensors (the ONNX export's source: a checkpoint read band by band, never loaded) gives a
    quantized checkpoint's matrices as the weights their layout stands for (`formats.dequantize` of the stored
    bytes: the K-quants, q8_0, and plain tensors as stored), any band of rows alike; a corrupted quantized
    tensor is the loader's clear error."""
    import json

    from safetensors.torch import load_file

    from qwen35.checkpoint_index import CheckpointTensors
    from qwen35.errors import CheckpointError
    from qwen35.quant.checkpoint import save_quantized
    from qwen35.quant.formats import dequantize

    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant="int4", kernels=False)
    out = save_quantized(model, tiny_dir, tmp_path / "q")
    stored = json.loads((out / "config.json").read_text())["quantization_config"]["tensors"]
    assert {"q4_k", "q6_k", "q8_0"} <= set(stored.values())
    files = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    tensors = CheckpointTensors(out)
    try:
        for name, scheme in stored.items():
            full = dequantize(scheme, files[name + ".qs"], files[name + ".d"])
            N = full.shape[0]
            assert torch.equal(tensors.rows(name, 0, N), full), name
            a, b = N // 3, min(N, N // 3 + 5)
            assert torch.equal(tensors.rows(name, a, b), full[a:b]), name
        gate = "model.layers.0.linear_attn.in_proj_a.weight"
        with pytest.raises(IndexError, match=rf"rows 0\.\.3 of '{gate}', which has 2"):
            tensors.rows(gate, 0, 3)
        plain = "model.layers.0.input_layernorm.weight"
        assert torch.equal(tensors.rows(plain, 0, tensors.shapes[plain][0]), files[plain])
    finally:
        tensors.close()
    bad, key = _with_a_truncated_matrix(out, tmp_path / "bad")
    tensors = CheckpointTensors(bad)
    try:
        with pytest.raises(CheckpointError, match=rf"quantized tensor '{key}' does not match"):
            tensors.rows("model.layers.0.mlp.down_proj.weight", 0, 1)
    finally:
        tensors.close()


def _quantize_and_reload(src, out, quant="int4"):
    """(quantize-at-load model, the same written by `qwen35 quantize`'s save_quantized and loaded back)."""
    from qwen35.quant.checkpoint import save_quantized

    direct = qwen35.load_model(src, dtype=torch.bfloat16, quant=quant, kernels=False)
    save_quantized(direct, src, out)
    return direct, qwen35.load_model(out, dtype=torch.bfloat16, kernels=False)


def test_odd_sized_matrices_quantize_to_an_aligned_checkpoint_that_reloads(tmp_path):
    """Odd sizes give fp16 scale arrays of odd length, which used to leave the fp32 tensors after them at
    offsets torch cannot view: the written file must align every tensor, and reload bit-identically."""
    import json

    from qwen35.safetensors_io import read_header

    src, out = tmp_path / "odd", tmp_path / "q"
    build_replica(src, "tiny", seed=6, hidden_size=288, intermediate_size=544, vocab_size=777, head_dim=64,
                  linear_key_head_dim=32, linear_value_head_dim=32, num_hidden_layers=4, tie_word_embeddings=False)
    direct, again = _quantize_and_reload(src, out)
    shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    entries = [e for s in shards for e in read_header(out / s).values()]
    assert any(e.dtype == torch.float32 for e in entries)
    assert all(e.start % e.dtype.itemsize == 0 for e in entries), [e.name for e in entries
                                                                   if e.start % e.dtype.itemsize]
    tensors = json.loads((out / "config.json").read_text())["quantization_config"]["tensors"]
    assert "q4_0" in tensors.values()  # K = 288 is no K-quant's: the odd-length scale arrays are there
    for name in tensors:
        a, b = _weight(direct, name), _weight(again, name)
        assert torch.equal(a.qs, b.qs) and torch.equal(a.d, b.d), name
    ids = torch.randint(0, 777, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(direct(ids), again(ids))


def test_quantized_checkpoint_keeps_the_vision_tower(tmp_path):
    """The tower lives outside the module tree, so the quantized checkpoint must store it on purpose: it
    reloads unquantized, equal to quantize-at-load's, and an image prompt gives the same logits."""
    import json

    from PIL import Image

    from qwen35.multimodal import VisionPrompt, prepare_prompt, rope_positions

    src, out = tmp_path / "vlm", tmp_path / "q"
    build_replica(src, "tiny", seed=7, vision=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(image_token_id=316, video_token_id=317, vision_start_token_id=318, vision_end_token_id=319)
    (src / "config.json").write_text(json.dumps(cfg))  # the official ids are past the tiny vocabulary
    direct, again = _quantize_and_reload(src, out)
    source_keys = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    written = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    visual = {k for k in source_keys if k.startswith("model.visual.")}
    assert visual and visual <= written.keys()
    assert again.visual is not None
    ref = dict(direct.visual.named_parameters())
    for n, p in again.visual.named_parameters():
        assert p.dtype == ref[n].dtype and torch.equal(p, ref[n]), n

    pad, start, end = cfg["image_token_id"], cfg["vision_start_token_id"], cfg["vision_end_token_id"]
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    prompt = [5, 9, 2, start, pad, end, 7, 3]

    def logits(model):
        ids, inputs, _ = prepare_prompt(model, prompt, [picture])
        pos, _ = rope_positions(ids, inputs, pad, 0)
        embeds = VisionPrompt(list(ids), list(inputs), (pad,)).embeddings(model)
        with torch.no_grad():
            return model(torch.tensor([ids]), positions=pos[:, None], inputs_embeds=embeds)

    assert torch.equal(logits(direct), logits(again))


@pytest.mark.parametrize("alias, file_type", [("int8", "q8_0"), ("int4", "q4_k_m")])
def test_export_accepts_the_policy_names_as_gguf_types(tmp_path, alias, file_type):
    """`--quant int8 / int4` name the policies the GGUF types q8_0 / q4_k_m write: `export --type` takes them
    too and writes the very same file; the help lists every name it accepts."""
    import argparse
    from pathlib import Path

    from qwen35.commands import export
    from qwen35.gguf.writer import FILE_TYPES, TYPE_ALIASES

    bundled = Path(qwen35.__file__).parent / "assets" / "model"  # small, and with the tokenizer a GGUF holds

    p = argparse.ArgumentParser()
    export.setup_parser(p)
    for name in (*FILE_TYPES, *TYPE_ALIASES):
        assert name in p._option_string_actions["--type"].help
    files = []
    for t in (alias, file_type):
        files.append(tmp_path / f"{t}.gguf")
        assert export.main(p.parse_args([str(bundled), str(files[-1]), "--type", t, "--name", "tiny"])) == 0
    assert files[0].read_bytes() == files[1].read_bytes()
