"""The vocabulary-banded cross-entropy (train/vocab_loss.py) against F.cross_entropy on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen35.quant.weight import QuantizedWeight
from qwen35.train.data import IGNORE
from qwen35.train.vocab_loss import banded_cross_entropy


def case(seed=0, N=37, K=64, V=1000):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, K, generator=g)
    w = torch.randn(V, K, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[[3, 10, 11]] = IGNORE
    y[0], y[1] = 0, V - 1  # the first and the last vocabulary entry, at band edges
    return h, w, y


def reference(h, w, y):
    h = h.clone().requires_grad_(True)
    loss = F.cross_entropy(h @ w.T, y, ignore_index=IGNORE, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad


def banded(h, w, y, band, scale=1.0):
    h = h.clone().requires_grad_(True)
    loss = banded_cross_entropy(h, w, y, band=band)
    (loss * scale).backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("band", [1000, 128, 97, 1])
def test_equals_full_logits_cross_entropy(band):
    h, w, y = case()
    want_loss, want_grad = reference(h, w, y)
    loss, grad = banded(h, w, y, band)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    assert grad[[3, 10, 11]].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q6_k"])
def test_quantized_head_equals_its_dequantized_matrix(scheme):
    h, w, y = case(1, K=256)
    q = QuantizedWeight.quantize(scheme, w)
    want_loss, want_grad = reference(h, q.dequantize(torch.float32), y)
    loss, grad = banded(h, q, y, band=300, scale=2.5)  # an upstream gradient != 1 scales dH
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(grad, 2.5 * want_grad, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_the_unbanded_head_under_autocast():
    h, w, y = case(2)
    hr = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy((hr @ w.T).float(), y, ignore_index=IGNORE, reduction="sum")
        hb = h.clone().requires_grad_(True)
        loss = banded_cross_entropy(hb, w, y, band=128)
    want.backward()
    loss.backward()
    # both round h and W to bf16 and accumulate in fp32: they differ only in summation order
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(hb.grad, hr.grad, rtol=2e-2, atol=2e-3)


def test_a_trainable_head_is_refused():
    h, w, y = case()
    with pytest.raises(ValueError, match="frozen head"):
        banded_cross_entropy(h, w.requires_grad_(True), y)
