"""Open a GGUF file (or all parts of a split one, `-00001-of-0000N.gguf`): metadata, tensor index and read-only
views of the tensor bytes, with a CheckpointError naming the file and tensor for every problem: not GGUF,
truncated, an unknown tensor type, a part of a split missing. Tensors come out as torch tensors in torch dim
order. Type ids, block sizes and dequantization come from the `gguf` package; the parsing is ours, because
its reader builds a Python object per array element (~50 s for a 250k-token vocabulary, against ~1 s here).
"""

from __future__ import annotations

import codecs
import math
import mmap
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ..errors import CheckpointError

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})(?P<ext>\.(?i:gguf))$")
MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses a tensor of more dims
FLOAT_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
               GGMLQuantizationType.BF16: torch.bfloat16}
NUMPY_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
# GGUF metadata value types -> numpy dtype; 7 is bool, 8 string, 9 array
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
           12: "<f8"}
BOOL, STRING, ARRAY = 7, 8, 9


def is_gguf(path: str | Path) -> bool:
    """The public test (`qwen35.gguf.is_gguf`): whether `path` is a GGUF file to load, told by its magic whatever
    its name, as load_model tells it. (It had been `.gguf` by name only, lower case, so it disagreed with what
    load_model did for `.GGUF` files and GGUFs without the extension.)"""
    return is_gguf_file(path)


def is_gguf_path(path: str | Path) -> bool:
    """Whether `path` names a GGUF: `.gguf` in any case (existing or not: a missing one is then said to be a
    missing GGUF), or an existing file with the GGUF magic whatever its name. Where a GGUF is told from a
    checkpoint directory (load, info, verify, quantize, export)."""
    return Path(path).suffix.lower() == ".gguf" or is_gguf_file(path)


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file to open as GGUF: named `.gguf` in any case (`.GGUF` too; one without the magic
    is then refused by open_gguf as not GGUF, by name), or any file that starts with the GGUF magic whatever
    its name. A directory or a missing path is not."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def split_parts(path: Path) -> list[Path]:
    """The files of the model `path` names: itself, or every part of its split (any part may be named)."""
    m = SPLIT_RE.match(path.name)
    if m is None:
        return [path]
    count = int(m.group("count"))
    stem, ext = m.group("stem"), m.group("ext")  # the parts keep the named part's extension (.gguf or .GGUF)
    parts = [path.with_name(f"{stem}-{k:05d}-of-{count:05d}{ext}") for k in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(f"{path}: split GGUF part {missing[0]} is missing from {path.parent}")
    return parts


@dataclass
class GGUFTensor:
    """One tensor: `shape` in GGUF order (ne0 first); `data` a read-only view of its bytes (F32 / F16 as that
    dtype in torch order, any other type as uint8 [..., bytes per row])."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data: np.ndarray
    type_offset: int  # file offset of its type id
    buf: np.ndarray | None = None  # the part's map (for release)
    offset: int = 0  # file offset of its data


@dataclass
class GGUFModelFile:
    """Metadata of the first part and the tensors of all parts, by name."""

    path: Path
    parts: list[Path]
    fields: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def nbytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())


def open_gguf(path: str | Path) -> GGUFModelFile:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    parts = split_parts(path)
    out = GGUFModelFile(path=parts[0], parts=parts, fields={})
    for k, p in enumerate(parts):
        fields, tensors = _read(p)
        if k == 0:
            out.fields = fields
        for t in tensors:
            if t.name in out.tensors:  # (twice within one file is refused by _read)
                raise CheckpointError(f"{p}: tensor '{t.name}' also appears in an earlier part of the split")
            out.tensors[t.name] = t
    return out


class _Parser:
    """A cursor over a memory-mapped GGUF file (v2 / v3, little-endian)."""

    def __init__(self, path: Path):
        self.path = path
        self.buf = np.memmap(path, mode="r")
        self.pos = 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: file is truncated inside its header (at byte {self.pos} of "
                                  f"{len(self.buf)})")

    def scalar(self, code: str):
        n = np.dtype(code).itemsize
        self.need(n)
        v = self.buf[self.pos : self.pos + n].view(code)[0].item()
        self.pos += n
        return v

    def string(self) -> str:
        n = self.scalar("<u8")
        self.need(n)
        b = self.buf[self.pos : self.pos + n].tobytes()
        self.pos += n
        return b.decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        import struct

        mv, pos, size, out = memoryview(self.buf), self.pos, len(self.buf), []
        unpack, decode = struct.Struct("<Q").unpack_from, codecs.utf_8_decode
        try:
            for _ in range(count):
                (n,) = unpack(mv, pos)
                if pos + 8 + n > size:
                    raise struct.error
                out.append(decode(mv[pos + 8 : pos + 8 + n], "replace")[0])
                pos += 8 + n
        except struct.error:
            self.pos = pos
            self.need(size + 1)
        self.pos = pos
        return out

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            sub, count = self.scalar("<u4"), self.scalar("<u8")
            if sub == STRING:
                return self.strings(count)
            if sub == ARRAY:
                return [self.value(ARRAY) for _ in range(count)]
            code = self._code(sub)
            n = np.dtype(code).itemsize * count
            self.need(n)
            arr = self.buf[self.pos : self.pos + n].view(code)
            self.pos += n
            return [bool(x) for x in arr] if sub == BOOL else arr.tolist()
        v = self.scalar(self._code(kind))
        return bool(v) if kind == BOOL else v

    def _code(self, kind: int) -> str:
        if kind not in SCALARS:
            raise CheckpointError(f"{self.path}: unknown GGUF metadata value type {kind} at byte {self.pos}")
        return SCALARS[kind]


def _read(p: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    if p.stat().st_size < 8:
        raise CheckpointError(f"{p}: not a GGUF file (only {p.stat().st_size} bytes)")
    r = _Parser(p)
    if r.buf[:4].tobytes() != MAGIC:
        raise CheckpointError(f"{p}: not a GGUF file (no GGUF magic at the start)")
    r.pos = 4
    version = r.scalar("<u4")
    if version not in (2, 3):
        raise CheckpointError(f"{p}: GGUF version {version} is not supported (2 and 3 are; a big-endian file?)")
    n_tensors, n_kv = r.scalar("<u8"), r.scalar("<u8")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        fields[key] = r.value(r.scalar("<u4"))
    infos, seen = [], set()
    for _ in range(n_tensors):
        name = r.string()
        if name in seen:
            raise CheckpointError(f"{p}: tensor '{name}' appears twice in the file")
        seen.add(name)
        n_dims = r.scalar("<u4")
        if n_dims > MAX_DIMS:  # read no further: a corrupt count would have us parse billions of dims
            raise CheckpointError(f"{p}: tensor '{name}' has {n_dims} dims (GGUF allows at most {MAX_DIMS}): the "
                                  f"header is corrupt")
        dims = [r.scalar("<u8") for _ in range(n_dims)]
        type_offset = r.pos
        infos.append((name, dims, r.scalar("<u4"), r.scalar("<u8"), type_offset))
    align = _alignment(p, fields)
    start = (r.pos + align - 1) // align * align
    tensors = [_tensor(p, r.buf, start, align, *info) for info in infos]
    _check_disjoint(p, tensors)
    return fields, tensors


def _alignment(p: Path, fields: dict[str, Any]) -> int:
    """general.alignment, where the tensor data starts: a power of two, as llama.cpp requires (0 cannot align,
    and any other value puts the data where no writer put it)."""
    align = fields.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align & (align - 1):
        raise CheckpointError(f"{p}: metadata key 'general.alignment' must be a power of two, got {align!r}")
    return align


def _tensor(p: Path, buf: np.ndarray, start: int, align: int, name: str, dims: list[int], type_id: int,
            offset: int, type_offset: int) -> GGUFTensor:
    try:
        kind = GGMLQuantizationType(type_id)
    except ValueError:
        raise CheckpointError(f"{p}: tensor '{name}' has GGML type id {type_id}, which this gguf package does not "
                              f"know (a newer llama.cpp type?)") from None
    block, size = GGML_QUANT_SIZES[kind]
    n = math.prod(dims)  # Python ints: np.prod wraps around in int64, and a corrupt dim made that 0 bytes
    row = dims[0] if dims else 1
    if row % block:
        raise CheckpointError(f"{p}: tensor '{name}' ({kind.name}) has rows of {row} values, not a multiple of "
                              f"its block of {block}")
    nbytes = n // block * size
    if nbytes > len(buf):
        raise CheckpointError(f"{p}: tensor '{name}' has dims {dims} ({kind.name}, {nbytes} bytes), more than the "
                              f"whole file ({len(buf)} bytes): the header is corrupt")
    if offset % align:  # as llama.cpp: a tensor's data starts on the file's alignment
        raise CheckpointError(f"{p}: tensor '{name}' has data offset {offset}, not a multiple of general.alignment "
                              f"({align}): the header is corrupt")
    at = start + offset
    if at + nbytes > len(buf):
        raise CheckpointError(f"{p}: file is truncated: tensor '{name}' ends at byte {at + nbytes} but the file has "
                              f"{len(buf)} bytes")
    shape = tuple(reversed(dims))
    raw = buf[at : at + nbytes]
    if kind in NUMPY_TYPES:
        data = raw.view(NUMPY_TYPES[kind]).reshape(shape)
    else:
        data = raw.reshape(*shape[:-1], row // block * size)
    return GGUFTensor(name, kind, np.array(dims, dtype=np.uint64), n, nbytes, data, type_offset, buf, at)


def _check_disjoint(p: Path, tensors: list[GGUFTensor]) -> None:
    """No two tensors' bytes overlap: a corrupt offset pointing into another tensor's data would load that
    tensor's bytes silently (a shape and type that fit pass every other check). Gaps are allowed."""
    prev = None
    for t in sorted((t for t in tensors if t.n_bytes), key=lambda t: t.offset):  # an empty tensor holds no bytes
        if prev is not None and t.offset < prev.offset + prev.n_bytes:
            raise CheckpointError(f"{p}: tensor '{t.name}' (data at byte {t.offset}) overlaps tensor '{prev.name}' "
                                  f"(bytes {prev.offset} to {prev.offset + prev.n_bytes}): the header is corrupt")
        if prev is None or t.offset + t.n_bytes > prev.offset + prev.n_bytes:
            prev = t  # the tensor that reaches furthest so far


SLICE_BYTES = 64 * 2**20


def release(t: GGUFTensor, start: int = 0, length: int | None = None) -> None:
    """Drop the mapped pages of bytes [start, start + length) of `t` from this process (MADV_DONTNEED): they
    stay in the page cache, but stop counting as its memory, so a load peaks at the model plus one slice (as
    safetensors_io does), not at the model plus the whole mapped file."""
    mm = getattr(t.buf, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    length = t.n_bytes - start if length is None else length
    page = mmap.PAGESIZE
    lo = (t.offset + start) // page * page
    hi = min(-(-(t.offset + start + length) // page) * page, len(mm))
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def copy_float_into(t: GGUFTensor, out: torch.Tensor) -> None:
    """An F32 / F16 / BF16 tensor straight from the map into `out` (same number of elements, any float dtype),
    a slice at a time, each slice's pages released after it is read: no intermediate copy."""
    kind = t.tensor_type
    with warnings.catch_warnings():  # the map is read-only, and is only read from here
        warnings.simplefilter("ignore", UserWarning)
        if kind == GGMLQuantizationType.BF16:
            src = torch.from_numpy(t.data.reshape(-1).view(np.int16)).view(torch.bfloat16)
        else:
            src = torch.from_numpy(t.data.reshape(-1))
    dst = out.view(-1)
    size = src.element_size()
    step = max(1, SLICE_BYTES // size)
    for a in range(0, src.numel(), step):
        dst[a : a + step].copy_(src[a : a + step])
        release(t, a * size, min(step, src.numel() - a) * size)


def to_torch(t: GGUFTensor, path: Path | None = None) -> torch.Tensor:
    """A GGUF tensor as a torch tensor in torch dim order: F32/F16/BF16 as they are (a copy), any other
    type dequantized to fp32 by the gguf package."""
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    kind = t.tensor_type
    if kind in FLOAT_TYPES:
        arr = np.array(t.data)  # a copy: the map is read-only
        if kind == GGMLQuantizationType.BF16:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(arr).reshape(shape)
    try:
        return torch.from_numpy(dequantize(t.data, kind).astype(np.float32, copy=False)).reshape(shape)
    except NotImplementedError:
        raise CheckpointError(f"{path or 'GGUF'}: tensor '{t.name}' has type {kind.name}, which cannot be "
                              f"dequantized yet") from None
