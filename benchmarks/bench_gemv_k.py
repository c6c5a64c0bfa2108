"""The K-quant GEMVs (q4_k, q6_k) side by side with q4_0 / q8_0 on decode shapes, in GB/s of weight bytes
read (the memory-bound figure of merit), and the fast quantizers' speed (what quantizing a 9B at load costs).

Random weights; each GEMV timed as the median (and the fastest, the
figure least disturbed by other processes) of `--reps` calls after warm-up, the schemes interleaved per
shape so that all of them see the same machine. Prints a table, then one JSON line.

    python benchmarks/bench_gemv_k.py [--rows 1] [--reps 30] [--shapes 248320x1024,7168x1024,1024x3584]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMES = ("q4_0", "q8_0", "q4_k", "q6_k")


def main() -> None:
    from qwen35.ops import kernels
    from qwen35.quant import QuantizedWeight, formats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1, help="input rows M (1..8)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--shapes", default="248320x1024,7168x1024,1024x3584")
    args = ap.parse_args()
    assert kernels.available(), kernels.unavailable_reason()
    g = torch.Generator().manual_seed(0)
    out = {"bench": "gemv_k", "rows": args.rows, "threads": torch.get_num_threads(), "gemv": {}, "quantize": {}}
    print(f"GEMV, {args.rows} input row(s), {torch.get_num_threads()} threads: ms per call and GB/s of weights")
    print(f"{'shape':<16}" + "".join(f"{s:>18}" for s in SCHEMES))
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        w = torch.randn(N, K, generator=g).bfloat16()
        x = torch.randn(args.rows, K, generator=g).bfloat16()
        qws = {}
        for s in SCHEMES:
            t = time.perf_counter()
            qs, d = formats.quantize_fast(s, w)
            out["quantize"].setdefault(s, []).append({"shape": shape, "s": time.perf_counter() - t,
                                                      "mweights_per_s": N * K / 1e6 / (time.perf_counter() - t)})
            qw = QuantizedWeight(s, qs, d, K)
            qw.kernels = True
            qws[s] = qw
        times = {s: [] for s in SCHEMES}
        with torch.no_grad():
            for s in SCHEMES:
                for _ in range(3):
                    qws[s].matmul(x, False)
            for _ in range(args.reps):
                for s in SCHEMES:  # interleaved: the same noise for every scheme
                    t = time.perf_counter()
                    qws[s].matmul(x, False)
                    times[s].append(time.perf_counter() - t)
        row = {}
        for s in SCHEMES:
            ms, best = statistics.median(times[s]) * 1e3, min(times[s]) * 1e3
            row[s] = {"ms": ms, "best_ms": best, "gbs": qws[s].nbytes / ms / 1e6, "best_gbs": qws[s].nbytes / best / 1e6,
                      "bytes": qws[s].nbytes}
        out["gemv"][shape] = row
        print(f"{shape:<16}" + "".join(f"{v['ms']:>9.3f} {v['gbs']:>5.1f}GB/s" for v in row.values()))
        print(f"{'  (fastest)':<16}" + "".join(f"{v['best_ms']:>9.3f} {v['best_gbs']:>5.1f}GB/s" for v in row.values()))
    print("\nquantize_fast, million weights per second (first shape's run includes nothing but the quantizer)")
    for s, runs in out["quantize"].items():
        print(f"{s:<8}" + "".join(f"{r['shape']:>16}: {r['mweights_per_s']:>8.1f}" for r in runs))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
