"""Reading safetensors files tensor by tensor, straight into their destination.

We parse the header ourselves (8-byte little-endian length, JSON, then raw data) so that:
- every inconsistency (bad header, unknown dtype, offsets past the end of a truncated file, a size that
  disagrees with the shape) is reported with the file and tensor name, and
- each tensor is copied from a memory map straight into the tensor that keeps it (converting dtype on
  the way) and the mapped pages are released behind the copy, so peak RSS stays near one copy of the
  weights while the copy runs at memory speed.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate the header of one .safetensors file; returns its tensors by name."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: corrupt safetensors file (only {size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header claims {header_len} bytes, "
                    f"file has {size})"
                )
            header_bytes = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, nbytes = _parse_entry(path, name, info)
        if data_start + begin + nbytes > size:
            raise CheckpointError(
                f"{path}: truncated file: tensor '{name}' ends at byte {data_start + begin + nbytes} but the "
                f"file has {size} bytes"
            )
        entries[name] = TensorEntry(name, Path(path), dtype, shape, data_start + begin, nbytes)
    return entries


def _short(v, n: int = 60) -> str:
    """A header value for a message: JSON as written, cut (a damaged shape may hold thousands of items)."""
    s = json.dumps(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is a Python int; never a size


def _parse_entry(path: Path, name: str, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One header entry checked against the format: (dtype, shape, begin, nbytes), begin relative to the data.
    A damaged or hand-written entry fails here, naming what is wrong, not as a TypeError in the arithmetic
    (or, for a float shape, which verify used to pass, only once load_model reads the tensor)."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt header entry for tensor '{name}': {problem}")

    if not isinstance(info, dict):
        raise bad(f"expected an object with dtype, shape and data_offsets, got {_short(info)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise bad(f"no '{key}'")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"dtype {_short(dtype)} is not a string")
    if dtype not in DTYPES:  # well formed, but a type we do not read (not damage: said as such)
        raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise bad(f"shape {_short(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {_short(offsets)} are not two integers [begin, end] with 0 <= begin <= end")
    (begin, end), nbytes = offsets, math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise bad(f"{end - begin} bytes stored for shape {shape} {dtype} ({nbytes} bytes expected)")
    return DTYPES[dtype], tuple(shape), begin, nbytes


class SafetensorsReader:
    """Copies tensors out of a memory-mapped file, in slices, converting dtype on the fly.

    After each slice the mapped pages are released (MADV_DONTNEED): they stay in the page cache but
    stop counting as this process's memory, so peak RSS is the weights plus one slice.
    """

    SLICE_BYTES = 64 * 2**20

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        size = os.path.getsize(self.path)
        # ACCESS_COPY: private and writable, so torch can wrap it; we never write, so nothing is copied.
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)

    def read(self, entry: TensorEntry, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into `out` (contiguous, same shape, any float dtype) or a new tensor."""
        if entry.start + entry.nbytes > self._bytes.numel():
            raise CheckpointError(f"{self.path}: truncated while reading tensor '{entry.name}'")
        if out is None:
            out = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes == 0:
            return out
        size = entry.dtype.itemsize
        raw = self._bytes[entry.start : entry.start + entry.nbytes]
        # The format does not require a tensor to start at a multiple of its element size (the safetensors
        # library loads such files): a misaligned one cannot be viewed in place, so each slice is copied out.
        aligned = entry.start % size == 0
        src = raw.view(entry.dtype) if aligned else raw
        dst = out.view(-1)
        n = entry.nbytes // size
        step = max(1, self.SLICE_BYTES // size)
        for a in range(0, n, step):
            piece = src[a : a + step] if aligned else src[a * size : (a + step) * size].clone().view(entry.dtype)
            dst[a : a + step].copy_(piece)
            self._release(entry.start + a * size, min(step, n - a) * size)
        return out

    def _release(self, start: int, length: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = start // page * page
        hi = -(-(start + length) // page) * page
        self._map.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(self._map)) - lo)

    def close(self) -> None:
        del self._bytes
        if self._map is not None:
            self._map.close()
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor in its stored dtype (convenience; loaders keep a SafetensorsReader open)."""
    with SafetensorsReader(entry.file) as r:
        return r.read(entry)
