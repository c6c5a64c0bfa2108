"""Prompt-chunk attention over cached keys: the flash (private aten op) and public block-wise forms both
equal plain masked attention."""

import pytest
import torch
import torch.nn.functional as F

from qwen35.ops import attention
from qwen35.ops.attention import _blockwise_past, _flash_past, chunk_attention


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
