"""Fast C++ kernels against the reference torch paths they replace."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qwen35
from qwen35.cache import HybridCache
from qwen35.commands.replica import build_replica
from qwen35.model.deltanet import GatedDeltaNet
from qwen35.ops import kernels
from qwen35.ops.fast import _gdn_decode, bind_kernels

# Every test needs the kernels except the fallback tests at the end, which matter most where they are missing.
needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_kernels
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_kernels_really_run_in_parallel():
    """The kernels' parallel_for compiles OpenMP's pragma into our library: built without -fopenmp it runs on
    one thread whatever torch's setting (how decode ran at ~60% speed until this was found)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.qwen35.parallel_threads() == 2
        torch.set_num_threads(1)
        assert torch.ops.qwen35.parallel_threads() == 1
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 1000, 1024), (3, 77, 96), (4, 64, 4000), (8, 130, 33)])
def test_gemv_matches_matmul(M, N, K):
    x, w = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16()
    ref = x.float() @ w.float().t()
    out = torch.ops.qwen35.gemv_bf16(x, w, True)
    assert out.dtype == torch.float32 and (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert rel(torch.ops.qwen35.gemv_bf16(x, w, False), ref) <= 4e-3


@needs_kernels
@pytest.mark.parametrize("N,K", [(1000, 1024), (77, 96), (40, 33)])
def test_gemv_rows_round_as_alone(N, K):
    """Each input row of a multi-row call (a speculative verify, a batch) gets exactly the bits it gets alone
    (a one-row decode step): greedy speculative decoding's exactness rests on it."""
    x, w = torch.randn(9, K).bfloat16(), torch.randn(N, K).bfloat16()
    together = torch.ops.qwen35.gemv_bf16(x, w, True)
    for m in range(9):
        assert torch.equal(together[m], torch.ops.qwen35.gemv_bf16(x[m : m + 1], w, True)[0])


@needs_kernels
@pytest.mark.parametrize("add_one", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm(add_one, dtype):
    x, w = torch.randn(5, 3, 256).to(dtype), torch.randn(256) * 0.3
    xf = x.float()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * ((1 + w) if add_one else w)
    out = torch.ops.qwen35.rmsnorm(x, w, 1e-6, add_one)
    assert out.dtype == dtype and (out.float() - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2)


@needs_kernels
def test_silu_mul():
    """The kernel rounds as the reference bf16 path does (silu(gate) to bf16, then the product to bf16): against
    it, at most one bf16 ulp apart (the kernel's exp is its own); against fp32, no further than that reference.
    (An absolute bound of 2e-2 against fp32 failed one random draw in ~200: at |output| > 8 a bf16 ulp is 0.06.)"""
    gu = torch.randn(64, 2 * 96, generator=torch.Generator().manual_seed(0)).bfloat16()
    gu[0, :4] = torch.tensor([9.0, -9.0, 30.0, -30.0])  # large |x|: silu ~ x, and ~ 0
    out = torch.ops.qwen35.silu_mul(gu).float()
    ref16 = (F.silu(gu[:, :96]) * gu[:, 96:]).float()
    exact = F.silu(gu[:, :96].float()) * gu[:, 96:].float()
    assert ((out - ref16).abs() <= 2**-7 * ref16.abs() + 1e-30).all()
    assert (out - exact).abs().max() <= (ref16 - exact).abs().max() * 1.01


@needs_kernels
@pytest.mark.parametrize("T", [1, 5, 70])
def test_conv_silu_matches_reference(T):
    from qwen35.ops.causal_conv import causal_conv1d

    x, w, state = torch.randn(2, T, 96).bfloat16(), torch.randn(96, 4).bfloat16(), torch.randn(2, 3, 96).bfloat16()
    y, new_state = torch.ops.qwen35.conv_silu(x, w, state)
    ref, ref_state = causal_conv1d(x, w, state)
    assert (y.float() - F.silu(ref).float()).abs().max() <= 2e-2 and torch.equal(new_state, ref_state)


@needs_kernels
def test_conv_silu_reads_a_column_slice_in_place():
    """Prefill hands conv_silu the qkv columns of the fused projection's output (rows at the wider stride): the
    same bits as on a contiguous copy; a tensor whose channels are strided is refused by name."""
    wide = torch.randn(2, 37, 160).bfloat16()
    x = wide[..., 16:112]  # 96 channels, rows 160 apart
    w, state = torch.randn(96, 4).bfloat16(), torch.randn(2, 3, 96).bfloat16()
    y, new_state = torch.ops.qwen35.conv_silu(x, w, state)
    y_ref, state_ref = torch.ops.qwen35.conv_silu(x.contiguous(), w, state)
    assert y.is_contiguous() and torch.equal(y, y_ref) and torch.equal(new_state, state_ref)
    with pytest.raises(RuntimeError, match="x with contiguous channels"):
        torch.ops.qwen35.conv_silu(torch.randn(2, 37, 192).bfloat16()[..., ::2], w, state)
    # a state or filter of another batch or channel count is named, not read past its end
    with pytest.raises(RuntimeError, match=r"conv_silu: sizes do not fit: x \[2, 37, 96\], w \[96, 4\], "
                                           r"state \[1, 3, 96\] \(channels a multiple of 16, 2-8 taps\)"):
        torch.ops.qwen35.conv_silu(x, w, state[:1].contiguous())
    with pytest.raises(RuntimeError, match="conv_silu: sizes do not fit"):
        torch.ops.qwen35.conv_silu(x, w[:80].contiguous(), state)


@needs_kernels
@pytest.mark.parametrize("lengths", [[1], [70, 5], [1500, 3, 600]])
def test_attention_decode_matches_sdpa(lengths):
    """Each row's query against its own buffer (capacities differ), over its own length."""
    q = torch.randn(len(lengths), 8, 256).bfloat16()
    ks = [torch.randn(2, n + 9 * (b + 1), 256).bfloat16() for b, n in enumerate(lengths)]
    vs = [torch.randn_like(k) for k in ks]
    out = torch.ops.qwen35.attn_decode(q, ks, vs, lengths, 256**-0.5)
    for b, n in enumerate(lengths):
        ref = F.scaled_dot_product_attention(q[b : b + 1, :, None].float(), ks[b][None, :, :n].float(),
                                             vs[b][None, :, :n].float(), enable_gqa=True)[:, :, 0]
        assert (out[b : b + 1].float() - ref).abs().max() <= 1e-2


@needs_kernels
def test_gated_deltanet_decode_step_matches_reference():
    from qwen35.config import ModelConfig
    from qwen35.shapes import text_config

    cfg = ModelConfig.from_hf(text_config("tiny", linear_num_value_heads=4))
    torch.manual_seed(0)
    layer = GatedDeltaNet(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
        layer.A_log.copy_(torch.rand(4).log())
        layer.norm.weight.copy_(1 + 0.1 * torch.randn(128))
    layer = layer.bfloat16()
    layer.A_log.data, layer.dt_bias.data, layer.norm.weight.data = (
        layer.A_log.float(), layer.dt_bias.float(), layer.norm.weight.float())
    from qwen35.ops.linear import fuse_linears

    owner, attr, linears = layer.fusion_group()
    setattr(owner, attr, fuse_linears(*linears))
    from qwen35.cache import DeltaNetState

    torch.manual_seed(1)
    conv = torch.randn(2, 3, cfg.linear_conv_dim).bfloat16()
    rec = torch.randn(2, 4, 128, 128) * 0.1
    s_fast, s_ref = DeltaNetState(conv, rec), DeltaNetState(conv.clone(), rec.clone())
    x = torch.randn(2, 1, cfg.hidden_size).bfloat16()
    with torch.inference_mode():
        fast = _gdn_decode(layer, x, s_fast)
        ref = layer(x, s_ref)  # the layer is unbound: the reference forward
    assert rel(fast, ref) <= 1e-2
    assert torch.equal(s_fast.conv, s_ref.conv)
    assert rel(s_fast.recurrent, s_ref.recurrent) <= 1e-3


def decode_logits(model, prompts, steps):
    """Prefill each prompt (all but its last `steps` tokens) alone, merge the rows into one batch and decode
    the remaining tokens together. Returns logits [B, steps, V]."""
    caches = []
    with torch.inference_mode():
        for p in prompts:
            c = model.make_cache()
            model(p[None, : len(p) - steps], cache=c)
            caches.append(c)
        cache = HybridCache.merge(caches)
        return torch.cat([model(torch.stack([p[len(p) - steps + i] for p in prompts])[:, None], cache=cache)
                          for i in range(steps)], 1)


def bf16_error(a, ref32):
    return ((a.float() - ref32).norm() / ref32.norm()).item()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "tiny"
    build_replica(d, "tiny", seed=3)
    return d


@needs_kernels
@pytest.mark.parametrize("whole_layers", [True, False])
def test_fast_decode_error_is_that_of_the_bf16_reference(tiny_dir, whole_layers):
    """Kernels bound (whole layers, or per op) vs the fp32 reference: the error must be no larger than the
    bf16 reference path's own (kernels off), on a batch whose rows hold different lengths."""
    fast = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    report = bind_kernels(fast, True, whole_layers=whole_layers)
    kinds = {"gdn_layer", "attn_layer"} if whole_layers else {"gdn_step", "attn_step"}
    assert kinds | {"delta_rule"} <= set(report.bound), report  # the prompts' delta rule: kernels/delta_rule.h
    ref16 = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    ref32 = qwen35.load_model(tiny_dir, dtype=torch.float32, kernels=False)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (n,), generator=gen) for n in (40, 9, 23)]
    exact = decode_logits(ref32, prompts, 4)
    e_fast, e_ref = bf16_error(decode_logits(fast, prompts, 4), exact), bf16_error(decode_logits(ref16, prompts, 4), exact)
    assert e_fast <= 1.25 * e_ref + 1e-3, (e_fast, e_ref)


@needs_kernels
def test_moving_the_model_rebinds_its_kernels(tiny_dir):
    """.to() gives every parameter a new tensor: fused matrices and bound kernels must follow, not keep
    reading the old weights."""
    model = qwen35.load_model(tiny_dir, dtype=torch.float32, kernels=True)
    ids = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(2))
    model.to(torch.bfloat16)
    assert model.kernels and model.fused
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0)  # visible only if the bound weights are the live ones
    got = decode_logits(model, [ids[0]], 2)
    ref = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    with torch.no_grad():
        ref.model.layers[0].mlp.down_proj.weight.mul_(0)
    assert bf16_error(got, decode_logits(ref, [ids[0]], 2)) <= 2e-2


def test_missing_kernels_fall_back_loudly():
    code = ("import torch, qwen35\n"
            "from qwen35.ops import kernels\n"
            "print('available', kernels.available())\n")
    env = {**os.environ, "QWEN35_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "available False" in out.stdout
    assert "fast CPU kernels unavailable (disabled by QWEN35_KERNELS=0); using the slower torch reference path" \
        in out.stderr


def test_binding_without_kernels_keeps_the_reference(tiny_dir, monkeypatch):
    """Where no kernels can load (no compiler: neither the AVX512 library nor the portable one), asking for them
    binds nothing, says why, and the model still computes the reference logits. (A machine with a compiler but
    without AVX512-BF16 binds the portable ones: tests/test_portable_kernels.py.)"""
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(kernels, "portable_available", lambda: False)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "this CPU lacks AVX512-BF16")
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    report = bind_kernels(model, True)
    assert not report.enabled and report.reason == "this CPU lacks AVX512-BF16" and not report.bound
    assert all("forward" not in m.__dict__ for m in model.modules())
    ids = torch.randint(0, 4096, (1, 10), generator=torch.Generator().manual_seed(4))
    ref = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    with torch.inference_mode():
        assert torch.equal(model(ids), ref(ids))
        assert torch.equal(decode_logits(model, [ids[0]], 3), decode_logits(ref, [ids[0]], 3))


def test_policy_is_one_rule(tiny_dir, monkeypatch):
    from qwen35.ops.fast import kernel_policy

    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    monkeypatch.delenv("QWEN35_KERNELS", raising=False)
    small = sum(p.numel() for p in model.parameters()) < 50_000_000
    assert kernel_policy(model) is (not small)
    # quantized weights bind the kernels at any size: their torch path is the reference that dequantizes
    # every matrix at every call (the bundled model in int4: 20 tok/s there, ~1,000 on the kernels)
    assert small and kernel_policy(qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False, quant="int8"))
    monkeypatch.setenv("QWEN35_KERNELS", "1")
    assert kernel_policy(model) is True
    monkeypatch.setenv("QWEN35_KERNELS", "0")
    assert kernel_policy(model) is False


def test_kernels_build_wherever_the_cpu_has_them():
    """A compile error in the C++ must fail the suite, not quietly skip every kernel test."""
    if os.environ.get("QWEN35_KERNELS") == "0":
        pytest.skip("kernels switched off by QWEN35_KERNELS=0")
    if not kernels._cpu_has_avx512_bf16():
        pytest.skip("this CPU lacks AVX512-BF16 / VNNI: the reference path is what runs here")
    assert kernels.available(), kernels.unavailable_reason()


def _denormals(n: int = 1 << 22) -> torch.Tensor:
    """n copies of a denormal fp32 (~1.5e-39), made from its bits: converting 1e-39 from a Python float would
    itself be flushed to zero where flushing is on."""
    return torch.full((n,), 0x00100000, dtype=torch.int32).view(torch.float32)


@needs_kernels
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_flush_denormals_reaches_every_pool_thread(monkeypatch):
    """runtime.flush_denormals (the CLI's, for the process) sets FTZ/DAZ on the calling thread and on torch's
    pool threads (MXCSR is per thread): a parallel op over denormal inputs then sees zeros on every thread.
    QWEN35_FLUSH_DENORMALS=0 opts out."""
    from qwen35.runtime import flush_denormals

    before = torch.get_num_threads()
    x = _denormals()  # big enough to be split across threads
    try:
        torch.set_num_threads(2)
        assert flush_denormals(True)
        assert float((x * 1.0).abs().sum()) == 0.0
        flush_denormals(False)
        assert float((x * 1.0).abs().sum()) > 0.0
        monkeypatch.setenv("QWEN35_FLUSH_DENORMALS", "0")
        assert not flush_denormals(True)
        assert float((x * 1.0).abs().sum()) > 0.0
    finally:
        flush_denormals(False)
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_library_forwards_flush_denormals_only_while_they_run(tmp_path):
    """A library forward flushes denormals for its own duration (prefill measured 1.7x faster) and leaves the
    caller's floating-point state as it was (hypothesis, for one, refuses to run with subnormals flushed)."""
    from qwen35.runtime import denormals_flushed

    before = torch.get_num_threads()
    x = _denormals()
    try:
        torch.set_num_threads(2)
        with denormals_flushed():
            assert float((x * 1.0).abs().sum()) == 0.0
        assert float((x * 1.0).abs().sum()) > 0.0
        build_replica(tmp_path / "m", "tiny", seed=1)
        model = qwen35.load_model(tmp_path / "m", dtype=torch.bfloat16, kernels=True)
        seen = []
        layer = model.model.layers[0]
        hook = layer.register_forward_hook(lambda *a: seen.append(torch.ops.qwen35.flushing_denormals()))
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))  # a prefill (> 4 tokens) flushes
            model(torch.tensor([[1, 2]]))  # a decode-sized step does not (it measured the same either way)
        hook.remove()
        assert seen == [True, False]
        assert float((x * 1.0).abs().sum()) > 0.0 and float(torch.tensor(1e-39)) > 0.0
    finally:
        torch.set_num_threads(before)


# A library of one op: how many chunks at::parallel_for splits 64 items into, i.e. the threads it runs on (1 where
# the library was built without OpenMP, whatever torch's setting)
TINY = r"""
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#define STR2(x) #x
#define STR(x) STR2(x)
int64_t chunks() {
  std::atomic<int64_t> n{0};
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) { ++n; });
  return n;
}
TORCH_LIBRARY_FRAGMENT(qwen35_build_test, m) { m.def(STR(OPNAME) "() -> int", &chunks); }
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_a_build_tries_each_openmp_way_then_none_and_names_the_compiler_error(tmp_path, monkeypatch, capsys):
    """kernels._build tries each of openmp_variants() (macOS has two: Apple's clang and a GCC), then builds
    without OpenMP, saying so with the compiler's own error line (torch's message starts with the whole command
    line, which had been all a user saw). A build that compiles says so first, naming the directory where the
    library then lies (which a later process finds, and then says nothing)."""
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    bogus = (["-fno-such-openmp-flag"], [])
    monkeypatch.setattr(kernels, "openmp_variants", lambda: [bogus, (kernels.OPENMP, kernels.OPENMP)])
    assert kernels._build("qwen35_tiny", [src], [], ["-DOPNAME=second_way"], "tiny kernels") == (True, "")
    said = capsys.readouterr().err
    lead = "qwen35: compiling the tiny kernels for this CPU, once (about a minute on two cores; kept in "
    assert said.startswith(lead) and said.endswith(")\n") and said.count("\n") == 1, said
    root = Path(said[len(lead):-2])
    assert root == tmp_path / "ext" and len(list(root.glob("qwen35_tiny_omp1_*/qwen35_tiny_omp1_*.so"))) == 1
    monkeypatch.setattr(kernels, "openmp_variants", lambda: [bogus])
    assert kernels._build("qwen35_tiny", [src], [], ["-DOPNAME=no_way"], "tiny kernels") == (True, "")
    said = capsys.readouterr().err.split("\n", 1)[1]  # (after the compiling note)
    assert said.startswith("qwen35: tiny kernels built without OpenMP (") and said.endswith("; they run on one thread\n")
    assert "error" in said and "-fno-such-openmp-flag" in said and "[1/" not in said, said
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.qwen35_build_test.second_way() == 2
        assert torch.ops.qwen35_build_test.no_way() == 1
    finally:
        torch.set_num_threads(before)
