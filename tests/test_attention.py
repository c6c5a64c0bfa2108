"""Prompt-chunk attention over cached keys: the flash (private aten op) and public block-wise forms both
equal plain masked attention; a decoded token's attention (decode_attention) equals plain attention too, and the
model's decode steps take it."""

import pytest
import torch
import torch.nn.functional as F

from qwen35.ops import attention
from qwen35.ops.attention import _blockwise_past, _flash_past, chunk_attention, decode_attention


def masked_reference(q, k, v, past, scale):
    T, S = q.shape[2], k.shape[2]
    mask = torch.arange(S)[None] <= (past + torch.arange(T))[:, None]
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                          enable_gqa=True)


@pytest.mark.parametrize("past_attention", ["flash", "blockwise"])
@pytest.mark.parametrize("past,T", [(1, 5), (37, 16), (9000, 3)])
def test_chunk_attention_equals_masked_attention(past_attention, past, T, monkeypatch):
    if past_attention == "flash" and attention._FLASH is None:
        pytest.skip("this torch has no CPU flash attention op")
    monkeypatch.setattr(attention, "KEY_BLOCK", 4096)
    g = torch.Generator().manual_seed(past + T)
    q = torch.randn(2, 8, T, 32, generator=g)
    k, v = torch.randn(2, 2, past + T, 32, generator=g), torch.randn(2, 2, past + T, 32, generator=g)
    fn = _flash_past if past_attention == "flash" else _blockwise_past
    out = chunk_attention(q, k, v, past, 32**-0.5, past_attention=fn)
    assert (out - masked_reference(q, k, v, past, 32**-0.5)).abs().max() <= 1e-5


def test_without_the_private_op_the_public_form_runs(monkeypatch):
    """torch versions without aten._scaled_dot_product_flash_attention_for_cpu fall back, same result."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 16, generator=g), torch.randn(1, 4, 30, 16, generator=g), torch.randn(1, 4, 30, 16, generator=g)
    monkeypatch.setattr(attention, "_FLASH", None)
    out = chunk_attention(q, k, v, 24, 0.25)
    assert (out - masked_reference(q, k, v, 24, 0.25)).abs().max() <= 1e-5


@pytest.mark.parametrize("B,Hq,Hkv,S,block", [(1, 8, 2, 1, 4096), (2, 4, 4, 300, 128), (1, 6, 2, 1000, 256)])
def test_decode_attention_equals_attention(B, Hq, Hkv, S, block, monkeypatch):
    monkeypatch.setattr(attention, "KEY_BLOCK", block)  # several key blocks, the last one short
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, Hq, 1, 64, generator=g).bfloat16()
    k, v = torch.randn(B, Hkv, S, 64, generator=g).bfloat16() * 3, torch.randn(B, Hkv, S, 64, generator=g).bfloat16()
    out = decode_attention(q, k, v, 0.125)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.125, enable_gqa=Hq != Hkv)
    assert out.dtype == torch.bfloat16 and out.shape == (B, Hq, 1, 64)
    # fp32 throughout, one rounding to bf16 at the end
    assert ((out.double() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-5).all()


def test_decode_steps_take_it(monkeypatch):
    import qwen35
    from qwen35.commands.common import default_model
    from qwen35.generation import generate_step
    from qwen35.model import attention as model_attention

    model = qwen35.load_model(default_model(), dtype=torch.bfloat16, kernels=False)
    keys = []
    real = model_attention.decode_attention

    def spy(q, k, v, scale):
        keys.append(k.shape[2])
        return real(q, k, v, scale)

    monkeypatch.setattr(model_attention, "decode_attention", spy)
    steps = list(generate_step(model, list(range(10, 20)), params=qwen35.SamplingParams(temperature=0, max_tokens=4)))
    n_attn = sum(isinstance(layer.mixer, model_attention.GatedAttention) for layer in model.model.layers)
    assert len(steps) == 4 and n_attn
    # the prompt (10 tokens) is a prefill; each of the 3 steps after the first token attends over 11, 12, 13 keys
    assert keys == [11] * n_attn + [12] * n_attn + [13] * n_attn
