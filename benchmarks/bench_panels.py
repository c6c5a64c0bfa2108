"""The AMX panel GEMM (kernels/amx_panels.cpp) against the other ways a few dozen to a few hundred rows meet a
matrix: bf16 weights in oneDNN's GEMM, the integer VNNI GEMM on the packed bytes, dequantize + oneDNN, and the
panel kernel on the quantized and on the bf16 weights (layout code 0).

Weights cold: each case cycles through enough copies of the matrix (~150 MB) that none is in cache, as in a
model whose other layers ran in between. Milliseconds per matrix, medians of `--reps` rounds, all cases
interleaved per row count so they see the same machine. Needs AMX (Sapphire Rapids class). Prints a table,
then one JSON line.

    python benchmarks/bench_panels.py [--scheme q8_0] [--rows 17,32,64,128,192] [--shapes 8224x1024,1024x3584]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

CASES = ("bf16", "integer", "dequantize", "panels", "panels_bf16")


def _cases(x, qws, bfs, kind: int, none) -> dict:
    """Each case as a call over every copy of the matrix."""
    return {
        "bf16": lambda: [F.linear(x, b) for b in bfs],
        "integer": lambda: [torch.ops.qwen35.gemm_quant(x, w.qs, w.d, kind, False) for w in qws],
        "dequantize": lambda: [F.linear(x, w.dequantize(torch.bfloat16)) for w in qws],
        "panels": lambda: [torch.ops.qwen35.gemm_panels(x, w.qs, w.d, kind, False) for w in qws],
        "panels_bf16": lambda: [torch.ops.qwen35.gemm_panels(x, b, none, 0, False) for b in bfs],
    }


def main() -> None:
    from qwen35.ops import kernels
    from qwen35.quant.weight import GEMM_KINDS, QuantizedWeight
    from qwen35.runtime import WeightArena, tune_allocator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="q8_0", choices=tuple(GEMM_KINDS))
    ap.add_argument("--rows", default="17,32,64,128,192")
    ap.add_argument("--shapes", default="8224x1024,7168x1024,1024x3584,1024x2048")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    assert kernels.available(), kernels.unavailable_reason()
    assert torch.ops.qwen35.panels_supported(), "no AMX-BF16 tiles for oneDNN's micro-kernel on this CPU"
    tune_allocator()
    torch.set_num_threads(args.threads)
    kind, none = GEMM_KINDS[args.scheme], torch.empty(0)
    g = torch.Generator().manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{args.scheme}, {args.threads} threads, weights cold: ms per matrix (x: bf16 time / this)")
    print(f"{'shape':<12}{'rows':>6}" + "".join(f"{c:>18}" for c in CASES))
    with torch.no_grad():
        for shape in args.shapes.split(","):
            N, K = map(int, shape.split("x"))
            w0 = QuantizedWeight.quantize(args.scheme, torch.randn(N, K, generator=g))
            copies = max(2, 150_000_000 // (N * K))
            qws, bfs = [], []
            for _ in range(copies):
                arena = WeightArena(w0.qs.numel() + w0.d.numel() * 2 + 4096)
                qs, d = arena.take(w0.qs.shape, w0.qs.dtype), arena.take(w0.d.shape, w0.d.dtype)
                qs.copy_(w0.qs)
                d.copy_(w0.d)
                w = QuantizedWeight(args.scheme, qs, d, K)
                w.kernels = True
                qws.append(w)
                arena = WeightArena(N * K * 2 + 4096)
                bfs.append(arena.take((N, K), torch.bfloat16))
                bfs[-1].copy_(w.dequantize(torch.bfloat16))
            for M in rows:
                x = torch.randn(M, K, generator=g).bfloat16()
                fns = _cases(x, qws, bfs, kind, none)
                times = {c: [] for c in CASES}
                for f in fns.values():
                    f()
                for _ in range(args.reps):
                    for c, f in fns.items():
                        t = time.perf_counter()
                        f()
                        times[c].append((time.perf_counter() - t) / copies * 1e3)
                ms = {c: statistics.median(v) for c, v in times.items()}
                print(f"{shape:<12}{M:>6}" + "".join(f"{ms[c]:>9.2f} x{ms['bf16'] / ms[c]:<7.2f}" for c in CASES))
                results.append({"shape": shape, "rows": M, "ms": {c: round(v, 3) for c, v in ms.items()}})
    print(json.dumps({"bench": "panels", "scheme": args.scheme, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
