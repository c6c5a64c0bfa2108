"""GGUF's Q8_0 / Q4_0 / Q4_K / Q6_K block bytes <-> our (qs, d) arrays, byte for byte (no requantization
either way).

A GGUF Q8_0 / Q4_0 block of 32 weights is its fp16 scale d followed by its quants (Q8_0: 32 int8, 34 bytes;
Q4_0: 16 bytes of nibbles in the same order as ours, 18 bytes). We keep the same quants and scales in two
arrays (quant/formats.py): qs [N, K/32 * qs_cols] and d fp16 [N, K/32]. Q4_K / Q6_K super-blocks of 256 are
kept as they are (qs = the GGUF row bytes, d empty [N, 0]): a copy, nothing to split.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..quant import formats

GGUF_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K", "q6_k": "Q6_K"}  # our layout -> GGML type name
SCHEMES = {v: k for k, v in GGUF_TYPES.items()}


def is_k(scheme: str) -> bool:
    return formats.layout(scheme).d_per_block == 0


def block_bytes(scheme: str) -> int:
    """Bytes of one GGUF block (of formats.layout(scheme).block weights)."""
    return formats.layout(scheme).qs_cols + (0 if is_k(scheme) else 2)


def split_blocks(raw: np.ndarray, scheme: str, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """raw uint8 [N, K/32 * block_bytes] (a GGUF tensor's bytes) -> (qs, d) in our layout (copies)."""
    lay = formats.layout(scheme)
    raw = np.array(raw)  # a copy: the map is read-only
    if is_k(scheme):
        return torch.from_numpy(raw.reshape(lay.qs_shape(N, K))), torch.empty(N, 0, dtype=torch.float16)
    b = torch.from_numpy(raw.reshape(N, K // formats.BLOCK, block_bytes(scheme)))
    d = b[..., :2].contiguous().view(torch.float16).reshape(N, K // formats.BLOCK)
    qs = b[..., 2:].contiguous().view(lay.qs_dtype).reshape(lay.qs_shape(N, K))
    return qs, d


def split_into(raw: np.ndarray, scheme: str, qs: torch.Tensor, d: torch.Tensor) -> None:
    """`split_blocks` straight into qs [N, ...] and d [N, K/32] (contiguous rows of the model's arena): one
    strided copy from the file's pages, no intermediate."""
    if is_k(scheme):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            qs.copy_(torch.from_numpy(raw).reshape(qs.shape))
        return
    N, nb = d.shape
    half = block_bytes(scheme) // 2  # blocks are an even number of bytes, at even offsets: move 16-bit words
    with warnings.catch_warnings():  # the map is read-only, and is only read from here
        warnings.simplefilter("ignore", UserWarning)
        b = torch.from_numpy(raw.view(np.int16)).reshape(N, nb, half)
    qs.view(torch.int16).reshape(N, nb, half - 1).copy_(b[..., 1:])
    d.view(torch.int16).copy_(b[..., 0])


def join_blocks(qs: torch.Tensor, d: torch.Tensor, scheme: str) -> np.ndarray:
    """(qs, d) in our layout -> GGUF's bytes, uint8 [N, K/32 * block_bytes]."""
    lay = formats.layout(scheme)
    if is_k(scheme):
        return qs.contiguous().numpy()
    N, nb = d.shape
    q = qs.contiguous().view(torch.uint8).reshape(N, nb, lay.qs_cols)
    dd = d.contiguous().view(torch.uint8).reshape(N, nb, 2)
    return torch.cat([dd, q], dim=-1).reshape(N, nb * block_bytes(scheme)).numpy()


def block_order(cols: torch.Tensor, B: int = formats.BLOCK) -> torch.Tensor | None:
    """The block permutation a column permutation `cols` (new[:, j] = old[:, cols[j]]) amounts to, when it
    moves whole aligned blocks of B (32, or a K-quant's 256); None otherwise."""
    if cols.numel() % B:
        return None
    blocks = cols.reshape(-1, B)
    starts = blocks[:, 0]
    if bool((starts % B).any()) or not torch.equal(blocks, starts[:, None] + torch.arange(B)):
        return None
    return starts // B


def permute_blocks(qs: torch.Tensor, d: torch.Tensor, scheme: str,
                   order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of every row reordered (new block j = old block order[j]) on the packed form."""
    lay = formats.layout(scheme)
    N = qs.shape[0]
    q = qs.reshape(N, order.numel(), lay.qs_cols)[:, order].reshape(qs.shape)
    return q.contiguous(), (d if is_k(scheme) else d[:, order]).contiguous()
