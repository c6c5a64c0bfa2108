"""Reading safetensors files tensor by tensor, straight into their destination.

We parse the header ourselves (8-byte little-endian length, JSON, then raw data) so that:
- every inconsistency (bad header, unknown dtype, offsets past the end of a truncated file, a size that
  disagrees with the shape) is reported with the file and tensor name, and
- each tensor is read with readinto() into the tensor that keeps it: page cache is not resident memory,
  so peak RSS stays near one copy of the weights (an mmap would count touched pages of the file too).
"""

from __future__ import annotations

import json
import math
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
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor '{name}'") from None
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype_name}")
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt tensor '{name}': {end - begin} bytes stored for shape {list(shape)} "
                f"{dtype_name} ({expected} bytes expected)"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated file: tensor '{name}' ends at byte {data_start + end} but the file has "
                f"{size} bytes"
            )
        entries[name] = TensorEntry(name, Path(path), dtype, tuple(shape), data_start + begin, expected)
    return entries


def read_tensor(entry: TensorEntry, out: torch.Tensor | None = None, f=None) -> torch.Tensor:
    """Read one tensor. With `out` of the same dtype and shape, reads into it without another copy."""
    if out is None or out.dtype != entry.dtype:
        target = torch.empty(entry.shape, dtype=entry.dtype)
    else:
        target = out
    own = f is None
    if own:
        f = open(entry.file, "rb")
    try:
        f.seek(entry.start)
        if entry.nbytes:
            view = memoryview(target.view(torch.uint8).reshape(-1).numpy())
            got = f.readinto(view)
            if got != entry.nbytes:
                raise CheckpointError(f"{entry.file}: truncated while reading tensor '{entry.name}'")
    finally:
        if own:
            f.close()
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target
