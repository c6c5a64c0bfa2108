"""SafetensorsReader on files other writers make: a tensor need not start at a multiple of its element size."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from qwen35.safetensors_io import SafetensorsReader, read_header


def _write(path, tensors):
    """A safetensors file with `tensors` laid out back to back in the given order (no alignment), as the format
    allows and the safetensors library reads."""
    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


@pytest.mark.parametrize("slice_bytes", [64 * 2**20, 12])  # whole, and slices of 3 floats
def test_misaligned_tensors_are_read_exactly(tmp_path, monkeypatch, slice_bytes):
    monkeypatch.setattr(SafetensorsReader, "SLICE_BYTES", slice_bytes)
    g = torch.Generator().manual_seed(0)
    tensors = {"scales": torch.randn(3, generator=g).half(),  # 6 bytes: what follows starts at an odd pair
               "w": torch.randn(5, 7, generator=g), "v": torch.randn(11, generator=g),
               "b": torch.randn(1, generator=g).bfloat16()}
    path = tmp_path / "odd.safetensors"
    _write(path, tensors)
    entries = read_header(path)
    assert entries["w"].start % 4 and entries["v"].start % 4  # the case under test
    assert all(torch.equal(load_file(path)[k], t) for k, t in tensors.items())  # a valid file
    with SafetensorsReader(path) as r:
        for name, t in tensors.items():
            got = r.read(entries[name])
            assert got.dtype == t.dtype and torch.equal(got, t), name
            into = torch.empty(t.shape, dtype=torch.float32)
            assert torch.equal(r.read(entries[name], into), t.float()), name
