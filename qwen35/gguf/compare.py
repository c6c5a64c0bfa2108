"""What differs between two GGUF files: metadata keys and values, tensor names, shapes and types.

Used to hold our writer to llama.cpp's converter (tests/test_gguf.py, benchmarks/check_gguf_vs_llamacpp.py).
"""

from __future__ import annotations

from .reader import GGUFModelFile


def _short(v, n: int = 60) -> str:
    s = repr(v if not isinstance(v, list) or len(v) < 8 else f"[{len(v)} items]")
    return s if len(s) <= n else s[:n] + "..."


def diff_gguf(ours: GGUFModelFile, theirs: GGUFModelFile, ignore: tuple[str, ...] = ("GGUF.",)) -> list[str]:
    """One line per difference (empty: same keys, values, tensor names, shapes and types). Keys starting
    with a prefix in `ignore` are skipped."""
    out = []
    keys = [k for k in dict.fromkeys([*ours.fields, *theirs.fields]) if not k.startswith(ignore)]
    for k in keys:
        if k not in theirs.fields:
            out.append(f"key {k}: only ours ({_short(ours.fields[k])})")
        elif k not in ours.fields:
            out.append(f"key {k}: only theirs ({_short(theirs.fields[k])})")
        else:
            a, b = ours.fields[k], theirs.fields[k]
            if isinstance(a, float) or isinstance(b, float):
                same = abs(float(a) - float(b)) <= 1e-7 * max(1.0, abs(float(b)))
            else:
                same = a == b
            if not same:
                out.append(f"key {k}: ours {_short(a)} theirs {_short(b)}")
    for n in dict.fromkeys([*ours.tensors, *theirs.tensors]):
        a, b = ours.tensors.get(n), theirs.tensors.get(n)
        if a is None or b is None:
            out.append(f"tensor {n}: only {'theirs' if a is None else 'ours'}")
        elif a.shape.tolist() != b.shape.tolist() or a.tensor_type != b.tensor_type:
            out.append(f"tensor {n}: ours {a.tensor_type.name} {a.shape.tolist()} theirs "
                       f"{b.tensor_type.name} {b.shape.tolist()}")
    return out
