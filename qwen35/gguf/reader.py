"""Open a GGUF file (or all parts of a split one, `-00001-of-0000N.gguf`) with the `gguf` package's reader,
and turn its problems into CheckpointErrors that name the file and tensor: not GGUF, truncated, an unknown
tensor type, a part of a split missing. Tensors come out as torch tensors in torch dim order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from ..errors import CheckpointError

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
FLOAT_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
               GGMLQuantizationType.BF16: torch.bfloat16}


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".gguf" and not p.is_dir()


def split_parts(path: Path) -> list[Path]:
    """The files of the model `path` names: itself, or every part of its split (any part may be named)."""
    m = SPLIT_RE.match(path.name)
    if m is None:
        return [path]
    count = int(m.group("count"))
    parts = [path.with_name(f"{m.group('stem')}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(f"{path}: split GGUF part {missing[0]} is missing from {path.parent}")
    return parts


class _Reader(GGUFReader):
    """GGUFReader that checks each tensor's type and extent before mapping it, so the error can name it."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        for f in fields:
            _, name_data, _, dims, raw_dtype, offset = f.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                t = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise CheckpointError(f"tensor '{name}' has GGML type id {int(raw_dtype[0])}, which this gguf "
                                      f"package does not know (a newer llama.cpp type?)") from None
            block, nbytes = GGML_QUANT_SIZES[t]
            n = int(np.prod(dims))
            end = start_offs + int(offset[0]) + n * nbytes // block
            if end > size:
                raise CheckpointError(f"file is truncated: tensor '{name}' ends at byte {end} but the file has "
                                      f"{size} bytes")
        super()._build_tensors(start_offs, fields)


@dataclass
class GGUFModelFile:
    """Metadata of the first part and the tensors of all parts, by name."""

    path: Path
    parts: list[Path]
    fields: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)  # name -> gguf ReaderTensor

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
        r = _read(p)
        if k == 0:
            out.fields = {name: _value(f) for name, f in r.fields.items()}
        for t in r.tensors:
            if t.name in out.tensors:
                raise CheckpointError(f"{p}: tensor '{t.name}' also appears in an earlier part of the split")
            out.tensors[t.name] = t
    return out


def _read(p: Path) -> GGUFReader:
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{p}: not a GGUF file (no GGUF magic at the start)")
    try:
        return _Reader(p)
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from None
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: cannot read the GGUF header ({e}); the file may be truncated or "
                              f"corrupt ({p.stat().st_size} bytes)") from None


def _value(f) -> Any:
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a field we cannot decode is one we do not use
        return None


def type_name(t) -> str:
    return t.tensor_type.name


def to_torch(t, path: Path | None = None) -> torch.Tensor:
    """A GGUF tensor as a torch tensor in torch dim order: F32/F16/BF16 as they are (a copy), any other
    type dequantized to fp32 by the gguf package."""
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    kind = t.tensor_type
    if kind in FLOAT_TYPES:
        arr = np.ascontiguousarray(t.data)
        if kind == GGMLQuantizationType.BF16:
            return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(arr.copy()).reshape(shape)
    try:
        return torch.from_numpy(dequantize(t.data, kind).astype(np.float32, copy=False)).reshape(shape)
    except NotImplementedError:
        raise CheckpointError(f"{path or 'GGUF'}: tensor '{t.name}' has type {kind.name}, which cannot be "
                              f"dequantized yet") from None
