"""The prompt-chunk attention kernel (kernels/prefill_attn.cpp, bound as GatedAttention.prompt_attention) against
the reference form it replaces (ops/attention.prompt_attention: torch's flash attention over the cached keys,
merged with the chunk's own causal part) and an fp32 answer."""

import pytest
import torch

import qwen35
from qwen35.cache import HybridCache
from qwen35.commands.replica import build_replica
from qwen35.generation import prefill
from qwen35.ops import kernels
from qwen35.ops.attention import prompt_attention
from qwen35.ops.fast import bind_kernels

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"kernels unavailable: {kernels.unavailable_reason()}")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def exact(q, k, v, past, scale):
    """fp32 causal attention of q [Hq, T, D] at positions past.. over k, v [Hkv, past + T, D]."""
    Hq, T, _ = q.shape
    G, S = Hq // k.shape[0], k.shape[1]
    kk, vv = k.float().repeat_interleave(G, 0), v.float().repeat_interleave(G, 0)
    s = (q.float() @ kk.transpose(-1, -2)) * scale
    visible = torch.arange(S)[None, :] <= (past + torch.arange(T))[:, None]
    return torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ vv


def inputs(Hkv, G, D, past, T, seed=0, cap=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(Hkv * G, T, D, generator=gen).bfloat16()
    S = past + T
    k = torch.randn(Hkv, S + cap, D, generator=gen).bfloat16()
    v = torch.randn(Hkv, S + cap, D, generator=gen).bfloat16()
    return q, k[:, :S], v[:, :S]  # views of a longer buffer where cap > 0, as a cache's are


@needs_kernels
@pytest.mark.parametrize("Hkv,G,D,past,T", [
    (2, 4, 256, 0, 37),      # a first chunk: causal within itself only
    (2, 4, 256, 700, 53),    # cached keys over 2+ blocks of 256, the diagonal inside a block
    (1, 1, 64, 5, 2),        # 2 rows: a tile far from full
    (2, 2, 96, 300, 17),     # D = 96: three 32-dim passes of P.V
    (1, 1, 64, 0, 300),      # 300 rows: several groups of 16 tiles
    (1, 4, 256, 3000, 40),   # 160 rows over 3,040 keys: groups and many blocks
    (2, 8, 128, 511, 129),   # odd key count (640), G = 8
])
def test_kernel_error_is_that_of_the_reference(Hkv, G, D, past, T):
    """Against fp32 attention of the same bf16 inputs, the kernel's error is no larger than the reference
    form's own (torch's bf16 flash attention, both rounding probabilities to bf16 and the output to bf16)."""
    q, k, v = inputs(Hkv, G, D, past, T, seed=T)
    out = torch.ops.qwen35.prefill_attn(q, k, v, past, D**-0.5)
    ref = prompt_attention(q[None], k[None], v[None], past, D**-0.5)[0]
    want = exact(q, k, v, past, D**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    e_kernel, e_ref = rel(out, want), rel(ref, want)
    assert e_kernel <= 1.25 * e_ref, (e_kernel, e_ref)


@needs_kernels
def test_a_query_sees_no_key_after_its_position():
    """Changing key j and its value (here to values that would dominate any softmax) leaves every query
    before position j bit for bit as it was: masked keys weigh exactly 0, not e^-87."""
    Hkv, G, D, past, T = 2, 4, 256, 300, 64
    q, k, v = inputs(Hkv, G, D, past, T, seed=1)
    before = torch.ops.qwen35.prefill_attn(q, k, v, past, D**-0.5)
    j = past + 40
    k2, v2 = k.clone(), v.clone()
    k2[:, j:] = q[::G, 40:41].expand(-1, past + T - j, -1) * 30  # aligned with the queries: huge scores
    v2[:, j:] = 1000.0
    after = torch.ops.qwen35.prefill_attn(q, k2, v2, past, D**-0.5)
    assert torch.equal(after[:, :40], before[:, :40])
    assert not torch.equal(after[:, 40:], before[:, 40:])


@needs_kernels
def test_strided_cache_views_read_in_place():
    """k and v as views of a longer cache buffer (what HybridCache hands over) give the contiguous copy's
    answer exactly."""
    q, k, v = inputs(2, 4, 256, 200, 30, seed=2, cap=77)
    assert not k.is_contiguous()
    assert torch.equal(torch.ops.qwen35.prefill_attn(q, k, v, 200, 0.0625),
                       torch.ops.qwen35.prefill_attn(q, k.contiguous(), v.contiguous(), 200, 0.0625))


@needs_kernels
def test_bad_shapes_are_named():
    q, k, v = inputs(2, 4, 256, 10, 5)
    with pytest.raises(RuntimeError, match="15 keys for 9 cached and 5 new"):
        torch.ops.qwen35.prefill_attn(q, k, v, 9, 0.1)
    with pytest.raises(RuntimeError, match="head dim 48"):
        torch.ops.qwen35.prefill_attn(q[..., :48].contiguous(), k[..., :48], v[..., :48], 10, 0.1)
    with pytest.raises(RuntimeError, match="bf16 q, k, v"):
        torch.ops.qwen35.prefill_attn(q.float(), k, v, 10, 0.1)
    with pytest.raises(RuntimeError, match="8 query heads over 3 KV heads"):
        torch.ops.qwen35.prefill_attn(q, k[:1].expand(3, -1, -1), v[:1].expand(3, -1, -1), 10, 0.1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pa") / "tiny"
    build_replica(d, "tiny", seed=5)
    return d


@needs_kernels
def test_bound_model_prefills_within_the_reference_error(tiny_dir):
    """The tiny replica (bf16, kernels on, so the kernel is bound) prefilling prompts of different lengths
    in chunks of 16 (each chunk over the keys of those before it): its logits are no further from the fp32
    model's than the bf16 reference path's (kernels off) are, and a bound model reports the kernel."""
    fast = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=True)
    assert "prefill_attn" in bind_kernels(fast, True).bound
    ref16 = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    ref32 = qwen35.load_model(tiny_dir, dtype=torch.float32, kernels=False)
    gen = torch.Generator().manual_seed(0)
    for n in (70, 33):
        ids = torch.randint(0, 4096, (1, n), generator=gen)
        logits = {name: prefill(m, ids, m.make_cache(), chunk_size=16)
                  for name, m in (("fast", fast), ("ref16", ref16), ("ref32", ref32))}
        e_fast, e_ref = rel(logits["fast"], logits["ref32"]), rel(logits["ref16"], logits["ref32"])
        assert e_fast <= 1.25 * e_ref + 1e-3, (n, e_fast, e_ref)


@needs_kernels
def test_unbinding_restores_the_reference_form(tiny_dir):
    from qwen35.model.attention import GatedAttention

    m = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=True)
    bind_kernels(m, True)
    attn = [x for x in m.modules() if isinstance(x, GatedAttention)]
    assert attn and all(x.prompt_attention is not prompt_attention for x in attn)
    bind_kernels(m, False)
    assert all(x.prompt_attention is prompt_attention for x in attn)
    assert isinstance(m.make_cache(), HybridCache)


@needs_kernels
def test_amx_machines_keep_torchs_form(tiny_dir, monkeypatch):
    """Where oneDNN has AMX tiles, torch's flash attention runs its bf16 products natively there: the kernel
    (AVX512-BF16 only, not measured against that) is not bound, and the model says so by omission."""
    import qwen35.quant.weight as qw
    from qwen35.model.attention import GatedAttention

    monkeypatch.setattr(qw, "prefill_gemm_machine", lambda: "amx")
    m = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=True)
    report = bind_kernels(m, True)
    assert "prefill_attn" not in report.bound and "delta_rule" in report.bound
    assert all(x.prompt_attention is prompt_attention for x in m.modules() if isinstance(x, GatedAttention))
