"""How one row's keys and values are stored in one attention layer: the KV cache formats.

- "bf16" (`KVBuffer`): k, v [Hkv, capacity, D] in the model's own dtype (bf16 for a bf16 model: the name is
  the scheme's; an fp32 model keeps fp32 keys).
- "q8_0" (`Q8KVBuffer`): GGUF's Q8_0 blocks along the head dimension: every 32 values of a key or value
  row share one fp16 scale d, x = d * q with q int8. Stored as k, v int8 [Hkv, capacity, D] and kd, vd fp16
  [Hkv, capacity, D/32] (the scales beside the values, as quant/formats.py keeps weights: two aligned
  streams for the kernel). 8.5 bits per value, 0.53x the bytes of bf16. Quantized on write with
  quant/formats.py's reference rule (ggml's quantize_row_q8_0_ref); the C++ decode path writes the same
  bytes (tests/test_kv_cache.py checks it).

A buffer is written from a row's length on (`write`) and read back over a prefix (`read`) or a range of
slots (`read_range`): the q8_0 read dequantizes, which is the reference path. Attention over a q8_0 cache
never dequantizes a whole prefix (at 128K that had taken 2.5x the layer's bf16 KV bytes, transiently, per
prefill chunk): its torch forms read it a block of keys at a time (ops/attention.py: prompt_attention_q8,
decode_attention_q8), the prefill kernel (prefill_attn_q8, ops/kernels/prefill_attn.cpp) dequantizes each
block of keys as it packs it, and the decode kernels (ops/fast.py -> attn_decode_q8 / decode_attn_layer,
ops/kernels/kv_kernels.cpp) read the int8 blocks directly and never expand them; they round the query
through Q8_0 blocks for their integer dot products.

Which rows hold which prefix of a buffer (copy-on-write, snapshots) is cache.py's business: a buffer only
knows its holders and how to copy a prefix of another buffer of its format into itself.

The Gated DeltaNet recurrent state is not stored here and stays fp32 whatever the KV format: it is small
(constant per row) and it is where rounding error would compound, token after token.
"""

from __future__ import annotations

import weakref

import torch

KV_CACHE_FORMATS = ("bf16", "q8_0")
BLOCK = 32  # values per Q8_0 block: quant/formats.py's BLOCK (imported lazily: quant/ imports the model,
# which imports the cache, which imports this module)


def _formats():
    from .quant import formats

    assert formats.BLOCK == BLOCK
    return formats


def check_kv_cache(name: str, head_dim: int | None = None) -> str:
    """`name` if it is a KV cache format we store (for a model with this `head_dim`, when given), else a
    QuantError naming the known formats or the head_dim the format cannot split into its blocks. load_model
    passes head_dim so a model the format cannot hold is refused at load, not at its first forward."""
    if name not in KV_CACHE_FORMATS:
        known = ", ".join(KV_CACHE_FORMATS)
        raise _formats().QuantError(f"unknown KV cache format {name!r} (known: {known})")
    if name == "q8_0" and head_dim is not None and head_dim % BLOCK:  # Q8KVBuffer.empty's rule
        raise _formats().QuantError(f"a q8_0 KV cache needs head_dim a multiple of {BLOCK}, got {head_dim}")
    return name


def kv_bytes_per_token(name: str, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in one attention layer, in format `name`."""
    return 2 * num_kv_heads * buffer_class(name).row_bytes(head_dim, dtype)


class KVBuffer:
    """Keys and values of one row in one attention layer in the model's dtype: k, v [Hkv, capacity, D],
    shared with the snapshots (and restored rows) that hold a prefix of it."""

    __slots__ = ("k", "v", "holders")
    format = "bf16"
    _storage = ("k", "v")  # the tensors [Hkv, capacity, ...] that take_storage and shrink replace

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.holders: weakref.WeakSet = weakref.WeakSet()  # objects with .length that read this buffer

    @classmethod
    def empty(cls, num_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> KVBuffer:
        return cls(torch.empty(num_kv_heads, capacity, head_dim, dtype=dtype, device=device),
                   torch.empty(num_kv_heads, capacity, head_dim, dtype=dtype, device=device))

    @classmethod
    def from_values(cls, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> KVBuffer:
        """A buffer holding k, v [Hkv, S, D] (of any float dtype), full to capacity S."""
        return cls(k.to(dtype).contiguous(), v.to(dtype).contiguous())

    @staticmethod
    def row_bytes(head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one head's key (or value) for one token."""
        return head_dim * dtype.itemsize

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's keys and values (all heads)."""
        return 2 * self.k.shape[0] * self.row_bytes(self.k.shape[2], self.k.dtype)

    @property
    def allocated_bytes(self) -> int:
        return self.token_bytes * self.capacity

    def held_by_others(self, me: object) -> int:
        """Longest prefix any other live holder (a snapshot, another row) relies on."""
        return max((h.length for h in list(self.holders) if h is not me), default=0)

    def take_storage(self, other: KVBuffer) -> None:
        """Use other's tensors (same format and heads) from now on: every holder of this buffer reads them."""
        for name in self._storage:
            setattr(self, name, getattr(other, name))

    def shrink(self, capacity: int) -> None:
        """Keep slots [0, capacity) only, in storage of that size: a copy, and the old storage is freed once
        nothing views it (a tensor cannot give back the middle of its layout). Which capacity is safe (no
        holder past it, no row still writing into the rest) is cache.py's to decide."""
        if not 0 < capacity < self.capacity:
            return
        # a normal tensor even under torch.inference_mode(), as KVCache._make makes it: rows restored from a
        # snapshot write into it later, outside that mode
        with torch.inference_mode(False):
            for name in self._storage:
                t = getattr(self, name)[:, :capacity]
                setattr(self, name, t.clone(memory_format=torch.contiguous_format))

    def copy_prefix(self, src: KVBuffer, n: int) -> None:
        """Tokens [0, n) of src (same format and heads) into this buffer."""
        self.k[:, :n] = src.k[:, :n]
        self.v[:, :n] = src.v[:, :n]

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, T, D] into slots start..start+T-1."""
        T = k.shape[1]
        self.k[:, start : start + T] = k
        self.v[:, start : start + T] = v

    def read(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, n), [Hkv, n, D] in `dtype` (views where nothing needs converting)."""
        return self.read_range(0, n, dtype)

    def read_range(self, s0: int, s1: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [s0, s1), [Hkv, s1 - s0, D] in `dtype`: what attention reads a block of keys
        at a time (ops/attention.py)."""
        return self.k[:, s0:s1].to(dtype), self.v[:, s0:s1].to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (q int8 [..., D], d fp16 [..., D/32]): Q8_0 blocks along the last dimension, by
    quant/formats.py's reference rule (scale max|x|/127 from fp32, values rounded half away from zero)."""
    D = x.shape[-1]
    q, d = _formats()._int8_blocks(x.float().reshape(*x.shape[:-1], D // BLOCK, BLOCK))
    return q.reshape(x.shape), d.half()


def dequantize_rows(q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values Q8_0 rows stand for: q int8 [..., D], d fp16 [..., D/32] -> [..., D] in dtype (the
    product q * d is exact in fp32, then rounded once to dtype)."""
    D = q.shape[-1]
    x = q.float().reshape(*q.shape[:-1], D // BLOCK, BLOCK) * d.float()[..., None]
    return x.reshape(q.shape).to(dtype)


class Q8KVBuffer(KVBuffer):
    """Keys and values of one row in one attention layer in Q8_0 blocks along D: k, v int8 [Hkv, capacity,
    D] and their scales kd, vd fp16 [Hkv, capacity, D/32]."""

    __slots__ = ("kd", "vd")
    format = "q8_0"
    _storage = ("k", "v", "kd", "vd")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor):
        super().__init__(k, v)
        self.kd, self.vd = kd, vd

    @classmethod
    def empty(cls, num_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> Q8KVBuffer:
        if head_dim % BLOCK:
            raise _formats().QuantError(f"a q8_0 KV cache needs head_dim a multiple of {BLOCK}, "
                                        f"got {head_dim}")
        shape, dshape = (num_kv_heads, capacity, head_dim), (num_kv_heads, capacity, head_dim // BLOCK)
        def make(s, dt):
            return torch.empty(s, dtype=dt, device=device)

        return cls(make(shape, torch.int8), make(shape, torch.int8), make(dshape, torch.float16),
                   make(dshape, torch.float16))

    @classmethod
    def from_values(cls, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> Q8KVBuffer:
        # through the model's dtype first, as keys computed by the model would be
        (kq, kd), (vq, vd) = quantize_rows(k.to(dtype)), quantize_rows(v.to(dtype))
        return cls(kq.contiguous(), vq.contiguous(), kd.contiguous(), vd.contiguous())

    @staticmethod
    def row_bytes(head_dim: int, dtype: torch.dtype) -> int:
        return head_dim + 2 * (head_dim // BLOCK)

    @property
    def token_bytes(self) -> int:
        return 2 * self.k.shape[0] * self.row_bytes(self.k.shape[2], self.k.dtype)

    def copy_prefix(self, src: Q8KVBuffer, n: int) -> None:
        super().copy_prefix(src, n)
        self.kd[:, :n] = src.kd[:, :n]
        self.vd[:, :n] = src.vd[:, :n]

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        T = k.shape[1]
        (kq, kd), (vq, vd) = quantize_rows(k), quantize_rows(v)
        self.k[:, start : start + T], self.kd[:, start : start + T] = kq, kd
        self.v[:, start : start + T], self.vd[:, start : start + T] = vq, vd

    def read_range(self, s0: int, s1: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # dequantized copies, through fp32 (8x the int8 bytes of the range at the peak): callers read blocks
        return (dequantize_rows(self.k[:, s0:s1], self.kd[:, s0:s1], dtype),
                dequantize_rows(self.v[:, s0:s1], self.vd[:, s0:s1], dtype))


_CLASSES = {"bf16": KVBuffer, "q8_0": Q8KVBuffer}


def buffer_class(name: str) -> type[KVBuffer]:
    return _CLASSES[check_kv_cache(name)]


def attend_reference(q: torch.Tensor, bufs: list[KVBuffer], lengths: list[int], scale: float,
                     dtype: torch.dtype = torch.float32, quantize_query: bool = False) -> torch.Tensor:
    """Decode attention the reference way (what the kernels are tested against): each row's cache read
    back over its length (dequantized, for q8_0), then softmax(q k^T * scale) v in `dtype`.
    quantize_query: first round q through Q8_0 blocks, as the q8_0 kernel does for its integer dot products
    with the keys (kv_kernels.cpp). q [B, Hq, D] (one query token per row) -> [B, Hq, D] in dtype."""
    if quantize_query:
        q = dequantize_rows(*quantize_rows(q), torch.float32)
    outs = []
    for b, (buf, n) in enumerate(zip(bufs, lengths)):
        k, v = buf.read(n, dtype)
        G = q.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
        s = (q[b].to(dtype)[:, None] @ k.transpose(-1, -2)).float() * scale  # [Hq, 1, n]
        outs.append((torch.softmax(s, -1).to(dtype) @ v)[:, 0])
    return torch.stack(outs)
