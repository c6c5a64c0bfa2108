"""GGUF's K-quants q4_k / q6_k: bytes GGUF reads as the same weights, the fast quantizer against the torch
reference, the kernels against the reference they replace, the policy's refusal of K that does not fit
super-blocks, and models that load, save and generate through them."""

import numpy as np
import pytest
import torch

import qwen35
from qwen35.commands.replica import build_replica
from qwen35.ops import kernels
from qwen35.quant import QuantError, QuantizedWeight, formats, kquants, policy

from greedy_ties import BUNDLED_PROMPTS, assert_same_greedy_answers

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")
SCHEMES = ["q4_k", "q6_k"]
GGML = {"q4_k": "Q4_K", "q6_k": "Q6_K"}
GEMV = {"q4_k": "gemv_q4_k", "q6_k": "gemv_q6_k"}


def awkward(N, K, seed):
    """Weights with the cases a super-block quantizer can get wrong: an all-zero super-block, a constant
    negative sub-block, an outlier of either sign, rows of very different scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 3
    w[0, :256] = 0
    w[1, :32] = -0.5
    w[2, 40] = 30
    w[3, 300 % K] = -30
    w[4] *= 1e-3
    return w


@pytest.mark.parametrize("scheme", SCHEMES)
def test_our_bytes_are_weights_gguf_reads(scheme):
    from gguf import GGMLQuantizationType, quants

    w = awkward(9, 512, 0)
    qs, d = formats.quantize(scheme, w)
    assert qs.dtype == torch.uint8 and tuple(qs.shape) == formats.layout(scheme).qs_shape(9, 512) and d.shape == (9, 0)
    ref = quants.dequantize(qs.numpy(), getattr(GGMLQuantizationType, GGML[scheme]))
    assert np.array_equal(formats.dequantize(scheme, qs, d).numpy(), ref)
    # and close to what was quantized (the layouts' own error, far below the weights' scale)
    err = (formats.dequantize(scheme, qs, d) - w).abs().mean() / w.abs().mean()
    assert err < (0.1 if scheme == "q4_k" else 0.03)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_any_gguf_bytes_read_as_gguf_reads_them(scheme):
    """GGUF tensors are our layout verbatim (no repacking either way): random blocks, any scales and mins,
    dequantize as gguf's reference does."""
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(1)
    nb = kquants.Q4K_BYTES if scheme == "q4_k" else kquants.Q6K_BYTES
    qs = torch.randint(0, 256, (5, 3 * nb), generator=g, dtype=torch.uint8)
    blocks = qs.view(5, 3, nb)
    halves = (torch.randn(5, 3, 2, generator=g) * 0.01).half().view(torch.uint8).reshape(5, 3, 4)
    if scheme == "q4_k":
        blocks[..., :4] = halves  # finite d and dmin
    else:
        blocks[..., 208:] = halves[..., :2]
    ref = quants.dequantize(qs.numpy(), getattr(GGMLQuantizationType, GGML[scheme]))
    assert np.array_equal(formats.dequantize(scheme, qs, torch.empty(5, 0, dtype=torch.float16)).numpy(), ref)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_requantizing_dequantized_weights_keeps_them(scheme):
    """Quantizing the dequantized weights again gives back the same weights (a fixed point of the format)."""
    w = torch.randn(6, 256, generator=torch.Generator().manual_seed(2))
    qs, d = formats.quantize(scheme, w)
    w1 = formats.dequantize(scheme, qs, d)
    w2 = formats.dequantize(scheme, *formats.quantize(scheme, w1))
    assert (w2 - w1).abs().max() <= 0.02 * w1.abs().max()


def test_k_quants_refuse_or_fall_back_where_k_does_not_fit():
    with pytest.raises(QuantError, match=r"cannot quantize a \[64, 288\] matrix to q4_k: K must be a multiple of 256"):
        QuantizedWeight.quantize("q4_k", torch.randn(64, 288))
    name = "model.layers.0.mlp.down_proj.weight"
    assert policy.scheme_for("q4_k", name, (64, 288), tied=True) == "q4_0"
    assert policy.scheme_for("q6_k", name, (64, 288), tied=True) == "q8_0"
    assert policy.scheme_for("q4_k", name, (64, 48), tied=True) is None
    assert policy.scheme_for("q4_k", name, (64, 512), tied=True) == "q4_k"
    shapes = {name: (64, 288), "model.layers.0.mlp.up_proj.weight": (64, 256)}
    assert policy.plan(lambda n, s, t: "q6_k", shapes, True) == {name: "q8_0", "model.layers.0.mlp.up_proj.weight": "q6_k"}
    for p in ("int4", "q4_k"):  # every choice fits its matrix, whatever the policy
        plan = policy.plan(p, {name: (64, 288), "lm_head.weight": (64, 288)}, False)
        assert all(formats.layout(s).fits(288) for s in plan.values()), plan


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_quantizer_writes_the_reference_bytes(scheme, dtype):
    w = awkward(37, 768, 3).to(dtype)  # 111 super-blocks: an odd count, so q4_k's pairs end half-filled
    ref, _ = formats.quantize(scheme, w)
    fast, d = formats.quantize_fast(scheme, w)
    assert torch.equal(fast, ref) and d.shape == (37, 0)


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M,N,K", [(1, 100, 256), (2, 33, 512), (3, 77, 768), (4, 16, 1024), (5, 130, 256),
                                   (6, 1, 512), (7, 65, 256), (8, 130, 1024)])
def test_gemv_kernels_equal_the_reference(scheme, M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    w = QuantizedWeight.quantize(scheme, torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g).bfloat16()
    op = getattr(torch.ops.qwen35, GEMV[scheme])
    out = op(x, w.qs, w.d, True)
    ref = formats.reference_matmul(scheme, x, w.qs, w.d)
    # the same products summed in another order: bound by fp32 rounding of the sum of |terms|
    xq, dx = formats.quantize_activations(x)
    xs = (xq.float().reshape(M, -1, 32) * dx[..., None]).reshape(M, K)
    bound = 1e-6 * (xs.abs() @ formats.dequantize(scheme, w.qs, w.d).abs().t()) + 1e-6
    assert ((out - ref).abs() <= bound).all()
    assert torch.equal(op(x, w.qs, w.d, False), out.bfloat16())
    assert torch.equal(op(x.float(), w.qs, w.d, True), out)  # fp32 inputs: the same quantized rows


@needs_kernels
@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_k", "q6_k"])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(scheme):
    """Every GEMV computes each input row in the same order whatever the number of rows (one accumulator chain
    per row), so a sequence's logits are bit for bit the same decoded alone, in a batch, or in a speculative
    verify pass. (The former K-quant kernels kept 4, 2 or 1 accumulators by row count: 1-ulp differences.)"""
    g = torch.Generator().manual_seed(5)
    K = 1024 if scheme in SCHEMES else 544
    w = QuantizedWeight.quantize(scheme, torch.randn(70, K, generator=g))
    x = torch.randn(8, K, generator=g).bfloat16()
    op = getattr(torch.ops.qwen35, "gemv_" + scheme)
    alone = torch.cat([op(x[i : i + 1], w.qs, w.d, True) for i in range(8)])
    for M in (2, 3, 5, 8):
        assert torch.equal(op(x[:M], w.qs, w.d, True), alone[:M]), M


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
def test_weight_object_runs_kernels_or_reference_alike(scheme):
    g = torch.Generator().manual_seed(9)
    w = QuantizedWeight.quantize(scheme, torch.randn(48, 512, generator=g))
    x = torch.randn(3, 512, generator=g).bfloat16()
    ref = w.matmul(x, True)
    w.kernels = True
    assert torch.allclose(w.matmul(x, True), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(w.dequantize(torch.bfloat16), formats.dequantize(scheme, w.qs, w.d, torch.bfloat16))
    assert torch.equal(w.dequantize(torch.bfloat16, 5, 9), w.slice(5, 9).dequantize(torch.bfloat16))
    assert torch.equal(w.rows(torch.tensor([[3, 0]]), torch.float32)[0], formats.dequantize(scheme, w.qs, w.d)[[3, 0]])
    assert w.nbytes == 48 * 512 * formats.layout(scheme).bits_per_weight / 8
    big = torch.randn(20, 512, generator=g).bfloat16()  # the prefill path: dequantized bands and a GEMM
    assert torch.allclose(w.matmul(big, True), big.float() @ w.dequantize().t(), rtol=1e-2, atol=1e-1)


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantize_kernel_equals_the_reference(scheme):
    w = QuantizedWeight.quantize(scheme, awkward(13, 512, 4))
    kind = formats.K_KIND[scheme]
    assert torch.equal(torch.ops.qwen35.dequant_k_bf16(w.qs, kind), formats.dequantize(scheme, w.qs, w.d, torch.bfloat16))
    big = torch.full((20, 512), 7.0, dtype=torch.bfloat16)  # into rows of a larger matrix, the others untouched
    torch.ops.qwen35.dequant_k_bf16_out(w.qs, kind, big[4:17])
    assert torch.equal(big[4:17], formats.dequantize(scheme, w.qs, w.d, torch.bfloat16))
    assert (big[:4] == 7).all() and (big[17:] == 7).all()
    with pytest.raises(RuntimeError, match=r"out must be contiguous bf16 \[13, 512\], got \[13, 256\]"):
        torch.ops.qwen35.dequant_k_bf16_out(w.qs, kind, torch.empty(13, 256, dtype=torch.bfloat16))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ktiny") / "tiny"
    build_replica(d, "tiny", seed=7)
    return d


@needs_kernels
@pytest.mark.parametrize("quant", ["q4_k", "int4"])
def test_kernels_and_reference_generate_the_same_tokens(quant):
    """The bundled model (trained: real next-token margins, see test_quant.py), quantized: greedy tokens
    through the K-quant kernels equal those of the reference matmuls on the same quantized weights."""
    from qwen35.commands.common import default_model
    from qwen35.ops.fast import quantized_weights

    fast, tok = qwen35.load(default_model(), dtype=torch.bfloat16, quant=quant, kernels=True)
    slow, _ = qwen35.load(default_model(), dtype=torch.bfloat16, quant=quant, kernels=True)
    objects = quantized_weights(slow)
    assert objects and all(w.kernels for w in objects) and "q4_k" in {w.scheme for w in objects}
    for w in objects:
        w.kernels = False
    assert_same_greedy_answers(slow, fast, tok, BUNDLED_PROMPTS[:3])


@needs_kernels
def test_quantized_replica_batch_equals_each_alone(tiny_dir):
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant="q4_k", kernels=True)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 4096, (n,), generator=gen).tolist() for n in (30, 7, 50)]
    params = qwen35.SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(-1,))
    alone = [[r.token for r in qwen35.generate_step(model, p, params=params)] for p in prompts]
    assert [[r.token for r in out] for out in qwen35.batch_generate(model, prompts, params)] == alone


def test_quantize_command_round_trips_k_quants(tiny_dir, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "qwen35", "quantize", str(tiny_dir), str(out), "--quant", "q4_k"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["policy"] == "q4_k" and set(cfg["tensors"].values()) == {"q4_k"}
    direct = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant="q4_k", kernels=False)
    again = qwen35.load_model(out, dtype=torch.bfloat16, kernels=False)
    assert again.quant == "q4_k"
    for name in cfg["tensors"]:
        module, _, attr = name.rpartition(".")
        a, b = getattr(direct.get_submodule(module), attr), getattr(again.get_submodule(module), attr)
        assert torch.equal(a.qs, b.qs) and b.d.shape == (a.qs.shape[0], 0), name
    ids = torch.randint(0, 4096, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(direct(ids), again(ids))
    # `qwen35 info` counts a K-quant matrix's weights from its blocks (their scales live inside: d is [N, 0]);
    # it had counted none of them
    params = [next(ln for ln in subprocess.run([sys.executable, "-m", "qwen35", "info", str(m)], capture_output=True,
                                               text=True, check=True).stdout.splitlines() if ln.startswith("parameters"))
              for m in (tiny_dir, out)]
    assert params[0] == params[1], params


def test_int4_spends_its_six_bits_where_they_buy_the_most():
    """int4 (policy.py's docstring; measured in benchmarks/bench_quant.py): q6_k for the head, every v_proj
    and the Gated DeltaNet projections of llama.cpp's more-bits layers; q8_0 gates; q4_k elsewhere."""
    shapes = {"model.embed_tokens.weight": (8192, 256)}
    for i in range(8):
        for p in ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj", "linear_attn.in_proj_a",
                  "self_attn.v_proj", "mlp.down_proj"):
            shapes[f"model.layers.{i}.{p}.weight"] = (256, 256)
    plan = policy.plan("int4", shapes, tied=True)
    assert [i for i in range(8) if policy.more_bits(i, 8)] == [0, 3, 6, 7]
    assert plan["model.embed_tokens.weight"] == "q6_k"
    for i in range(8):
        six = "q6_k" if i in (0, 3, 6, 7) else "q4_k"
        assert plan[f"model.layers.{i}.linear_attn.in_proj_qkv.weight"] == six
        assert plan[f"model.layers.{i}.linear_attn.out_proj.weight"] == six
        assert plan[f"model.layers.{i}.self_attn.v_proj.weight"] == "q6_k"
        assert plan[f"model.layers.{i}.linear_attn.in_proj_a.weight"] == "q8_0"
        assert plan[f"model.layers.{i}.mlp.down_proj.weight"] == "q4_k"
    assert policy.scheme_for("int4", "mtp.layers.0.self_attn.q_proj.weight", (256, 256), True, 8) == "q4_k"
