"""How far a quantized decode step is from streaming its weights: in the same minute, a plain read of as many
bytes, the model's GEMVs alone in decode order, and the whole decode step.

On the shared hosts here memory bandwidth swings 2x from minute to minute, so a bound probed at another moment
says little about a given run (`qwen35 bench`'s fraction of the read bound moved 45-89% on one Zen 4 host for the
same ~50 tok/s). Each round here measures the three back to back: a sum over a buffer of the weights' size (in the
same huge-page arena as the weights), every quantized matrix of a decode step through its GEMV kernel (one input
row), and a decode step of the model at a 512-token context. The two gaps, GEMVs / read (what splitting the
stream into ~190 matrices costs: parallel regions, each matrix's start) and step / GEMVs (everything else a step
does), are what a faster decode has to close. Prints a table, then one JSON line.

    python benchmarks/bench_stream_gap.py [--quant int4] [--rounds 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPLICA = HERE / ".cache" / "replica-0.8b"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPLICA)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import qwen35.generation as G
    from qwen35.runtime import WeightArena, tune_allocator

    from bench_gemv_ab import decode_model

    tune_allocator()
    model, mats = decode_model(args.model, args.quant, args.threads)
    xs = [torch.randn(1, w.shape[1]).to(torch.bfloat16) for w in mats]
    nbytes = sum(w.nbytes for w in mats)
    buf = WeightArena(nbytes).take((nbytes // 8,), torch.int64)
    buf.fill_(1)
    cache = model.make_cache()
    G.prefill(model, torch.randint(0, 240000, (1, 512), generator=torch.Generator().manual_seed(0)), cache, 512)
    token = torch.tensor([[5]])
    for _ in range(3):
        model(token, cache=cache, logits_to_keep=1)

    rows = []
    print(f"{len(mats)} matrices, {nbytes / 2**20:.0f} MiB, {args.quant}, {args.threads} threads")
    print(f"{'round':>6}{'read GB/s':>11}{'GEMVs GB/s':>12}{'step ms':>9}{'step GB/s':>11}{'GEMVs/read':>12}"
          f"{'step/GEMVs':>12}")
    for r in range(args.rounds):
        t = time.perf_counter()
        buf.sum()
        read = nbytes / (time.perf_counter() - t) / 1e9
        t = time.perf_counter()
        for w, x in zip(mats, xs):
            w.matmul(x, False)
        gemvs = nbytes / (time.perf_counter() - t) / 1e9
        t = time.perf_counter()
        model(token, cache=cache, logits_to_keep=1)
        step = time.perf_counter() - t
        rows.append((read, gemvs, step))
        print(f"{r + 1:>6}{read:>11.1f}{gemvs:>12.1f}{step * 1e3:>9.2f}{nbytes / step / 1e9:>11.1f}"
              f"{gemvs / read:>12.2f}{nbytes / step / 1e9 / gemvs:>12.2f}")
    g_r = statistics.median(g / r for r, g, _ in rows)
    s_g = statistics.median(nbytes / s / 1e9 / g for _, g, s in rows)
    print(f"median: GEMVs at {g_r:.2f} of the read, the step at {s_g:.2f} of the GEMVs")
    print(json.dumps({"bench": "stream_gap", "quant": args.quant, "threads": args.threads,
                      "mib": round(nbytes / 2**20), "gemvs_over_read": round(g_r, 3), "step_over_gemvs": round(s_g, 3),
                      "rounds": [{"read_gbs": round(r, 1), "gemvs_gbs": round(g, 1), "step_ms": round(s * 1e3, 2)}
                                 for r, g, s in rows]}))


if __name__ == "__main__":
    main()
