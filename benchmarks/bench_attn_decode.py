"""Decode attention alone: the bf16 KV kernel (`attn_decode`) and the q8_0 one (`attn_decode_q8`,
ops/kernels/kv_kernels.cpp) on the same keys and values, side by side in one process, alternating call by call
(the machine's drift hits both). One query token against S cached keys of one sequence, the 0.8B-9B shape by
default (2 KV heads of 256, 4 query heads each), 2 threads; reports ms per call (best of `--reps`), the GB/s
of KV bytes each streams, a plain 2-thread read of 256 MiB for scale, and q8_0's speed over bf16's (the byte
ratio, 512 / 272 = 1.88x, is what a memory-bound pair would show). `--portable` times the portable library's
attention (`portable_attn_decode`, ops/kernels/portable_layers.cpp: laptops without AVX512) on both formats
instead; held to AVX2 with QWEN35_PORTABLE_MARCH=x86-64-v3 QWEN35_KERNELS=portable.

    python benchmarks/bench_attn_decode.py [--contexts 4096,32768,131072] [--kv-heads 2] [--group 4]
        [--head-dim 256] [--reps 20] [--portable]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch


def read_bandwidth() -> float:
    x = torch.ones(64 * 2**20)  # 256 MiB
    best = float("inf")
    for _ in range(8):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--portable", action="store_true", help="the portable library's attention (both formats)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    from qwen35.kv_storage import quantize_rows
    from qwen35.ops import kernels

    if args.portable:
        if not kernels.portable_available():
            raise SystemExit(f"the portable kernels are unavailable here: {kernels.portable_reason()}")
    elif not kernels.available():
        raise SystemExit(f"the AVX512 kernels are unavailable here: {kernels.unavailable_reason()}")
    Hkv, G, D = args.kv_heads, args.group, args.head_dim
    bw = read_bandwidth()
    kind = "portable" if args.portable else "AVX512"
    print(f"{kind} kernels; {Hkv} KV heads x {D}, {G} query heads each, {args.threads} threads; "
          f"plain read {bw:.1f} GB/s")
    print(f"{'context':>8} {'bf16 ms':>9} {'GB/s':>6} {'q8_0 ms':>9} {'GB/s':>6} {'q8_0/bf16':>10}")
    rows = []
    for S in (int(c) for c in args.contexts.split(",")):
        gen = torch.Generator().manual_seed(S)
        k = torch.randn(Hkv, S, D, generator=gen).bfloat16()
        v = torch.randn(Hkv, S, D, generator=gen).bfloat16()
        q = torch.randn(1, Hkv * G, D, generator=gen).bfloat16()
        (kq, kd), (vq, vd) = quantize_rows(k), quantize_rows(v)
        kq, kd, vq, vd = kq.contiguous(), kd.contiguous(), vq.contiguous(), vd.contiguous()
        if args.portable:
            op = torch.ops.qwen35.portable_attn_decode
            calls = {"bf16": partial(op, q, [k], [v], [], [], [S], D**-0.5),
                     "q8_0": partial(op, q, [kq], [vq], [kd], [vd], [S], D**-0.5)}
        else:
            calls = {"bf16": partial(torch.ops.qwen35.attn_decode, q, [k], [v], [S], D**-0.5),
                     "q8_0": partial(torch.ops.qwen35.attn_decode_q8, q, [kq], [kd], [vq], [vd], [S], D**-0.5)}
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(args.reps):
            for name, fn in calls.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        nbytes = {"bf16": 2 * Hkv * S * D * 2, "q8_0": 2 * Hkv * S * (D + D // 16)}
        row = {"context": S, **{f"{n}_ms": round(best[n] * 1e3, 3) for n in calls},
               **{f"{n}_gb_s": round(nbytes[n] / best[n] / 1e9, 1) for n in calls},
               "q8_0_speedup": round(best["bf16"] / best["q8_0"], 3)}
        rows.append(row)
        print(f"{S:>8} {row['bf16_ms']:>9.3f} {row['bf16_gb_s']:>6.1f} {row['q8_0_ms']:>9.3f} "
              f"{row['q8_0_gb_s']:>6.1f} {row['q8_0_speedup']:>9.2f}x")
    print(json.dumps({"bench": "attn_decode", "kernels": kind, "kv_heads": Hkv, "group": G, "head_dim": D,
                      "threads": args.threads, "read_gb_s": round(bw, 1), "rows": rows}))


if __name__ == "__main__":
    main()
