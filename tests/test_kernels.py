"""Fast C++ kernels against the reference torch paths they replace."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import qwen35
from qwen35.commands.replica import build_replica
from qwen35.model.deltanet import GatedDeltaNet
from qwen35.ops import kernels
from qwen35.ops.dispatch import set_fast_kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


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


@pytest.mark.parametrize("M,N,K", [(1, 1000, 1024), (3, 77, 96), (4, 64, 4000), (8, 130, 33)])
def test_gemv_matches_matmul(M, N, K):
    x, w = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16()
    ref = x.float() @ w.float().t()
    out = torch.ops.qwen35.gemv_bf16(x, w, True)
    assert out.dtype == torch.float32 and (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert rel(torch.ops.qwen35.gemv_bf16(x, w, False), ref) <= 4e-3


@pytest.mark.parametrize("add_one", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm(add_one, dtype):
    x, w = torch.randn(5, 3, 256).to(dtype), torch.randn(256) * 0.3
    xf = x.float()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * ((1 + w) if add_one else w)
    out = torch.ops.qwen35.rmsnorm(x, w, 1e-6, add_one)
    assert out.dtype == dtype and (out.float() - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_silu_mul():
    gu = torch.randn(3, 2 * 96).bfloat16()
    ref = F.silu(gu[:, :96].float()) * gu[:, 96:].float()
    assert (torch.ops.qwen35.silu_mul(gu).float() - ref).abs().max() <= 2e-2


@pytest.mark.parametrize("T", [1, 5, 70])
def test_conv_silu_matches_reference(T):
    from qwen35.ops.causal_conv import causal_conv1d

    x, w, state = torch.randn(2, T, 96).bfloat16(), torch.randn(96, 4).bfloat16(), torch.randn(2, 3, 96).bfloat16()
    y, new_state = torch.ops.qwen35.conv_silu(x, w, state)
    ref, ref_state = causal_conv1d(x, w, state)
    assert (y.float() - F.silu(ref).float()).abs().max() <= 2e-2 and torch.equal(new_state, ref_state)


@pytest.mark.parametrize("S,pad", [(1, None), (70, [0, 5]), (1500, [3, 600])])
def test_attention_decode_matches_sdpa(S, pad):
    q = torch.randn(2, 8, 256).bfloat16()
    k, v = torch.randn(2, 2, S + 9, 256).bfloat16(), torch.randn(2, 2, S + 9, 256).bfloat16()
    p = torch.tensor(pad or [0, 0])
    mask = (torch.arange(S)[None] >= p[:, None])[:, None, None]
    ref = F.scaled_dot_product_attention(q[:, :, None].float(), k[:, :, :S].float(), v[:, :, :S].float(),
                                         attn_mask=mask, enable_gqa=True)[:, :, 0]
    out = torch.ops.qwen35.attn_decode(q, k, v, S, torch.tensor(pad) if pad else torch.empty(0, dtype=torch.long),
                                       256**-0.5)
    assert (out.float() - ref).abs().max() <= 1e-2


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

    def fresh():
        s = DeltaNetState(2, cfg.linear_conv_dim, 4, 4, 128, 128, torch.bfloat16)
        s.conv = torch.randn_like(s.conv.float()).bfloat16()
        s.recurrent = torch.randn_like(s.recurrent) * 0.1
        return s

    torch.manual_seed(1)
    s_fast, x = fresh(), torch.randn(2, 1, cfg.hidden_size).bfloat16()
    s_ref = DeltaNetState(2, cfg.linear_conv_dim, 4, 4, 128, 128, torch.bfloat16)
    s_ref.conv, s_ref.recurrent = s_fast.conv.clone(), s_fast.recurrent.clone()
    with torch.inference_mode():
        fast = layer(x, s_fast)
        set_fast_kernels(False)
        try:
            ref = layer(x, s_ref)
        finally:
            set_fast_kernels(True)
    assert rel(fast, ref) <= 1e-2
    assert torch.equal(s_fast.conv, s_ref.conv)
    assert rel(s_fast.recurrent, s_ref.recurrent) <= 1e-3


def decode_logits(model, ids, steps, pad=None):
    """Prefill all but the last `steps` tokens of ids [B, T], then decode them one by one.
    Returns (logits of the decoded tokens [B, steps, V], the cache)."""
    cache = model.make_cache(ids.shape[0])
    cache.pad = pad
    T = ids.shape[1]
    with torch.inference_mode():
        model(ids[:, : T - steps], cache=cache)
        return torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(T - steps, T)], 1), cache


def test_whole_model_fast_path_matches_reference(tmp_path):
    build_replica(tmp_path / "tiny", "tiny", seed=3)
    model = qwen35.load_model(tmp_path / "tiny", dtype=torch.bfloat16)
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    fast, _ = decode_logits(model, ids, 3)
    set_fast_kernels(False)
    try:
        ref, _ = decode_logits(model, ids, 3)
    finally:
        set_fast_kernels(True)
    assert rel(fast, ref) <= 2e-2


def test_missing_kernels_fall_back_loudly(tmp_path):
    code = ("import torch, qwen35\n"
            "from qwen35.ops import kernels\n"
            "print('available', kernels.available())\n")
    env = {**os.environ, "QWEN35_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "available False" in out.stdout
    assert "fast CPU kernels unavailable (disabled by QWEN35_KERNELS=0); using the slower torch reference path" \
        in out.stderr


def test_whole_layer_decode_kernels_match_per_op_path(tmp_path):
    import qwen35.model.qwen35 as qmodel

    build_replica(tmp_path / "tiny", "tiny", seed=5)
    model = qwen35.load_model(tmp_path / "tiny", dtype=torch.bfloat16)
    ids = torch.randint(0, 4096, (2, 30), generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([0, 4])  # padding reaches the attention kernel through `pad`
    fused, c1 = decode_logits(model, ids, 4, pad)
    qmodel.LAYER_KERNELS = False
    try:
        per_op, c2 = decode_logits(model, ids, 4, pad)
    finally:
        qmodel.LAYER_KERNELS = True
    assert rel(fused, per_op) <= 1e-2
    for a, b in zip(c1.layers, c2.layers):
        if hasattr(a, "buffer"):
            assert a.length == b.length == 30
            assert rel(a.buffer.k[:, :, :30], b.buffer.k[:, :, :30]) <= 1e-2
        else:
            assert rel(a.recurrent, b.recurrent) <= 1e-2
