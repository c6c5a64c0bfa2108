"""Prefill speed of quantized weights against bf16, side by side in one process.

Separate processes (bench_quant.py's speed table) see the machine drift between them: on this 2-core host
bf16 prefill@512 ran 413-509 tok/s across runs of the same hour, more than the difference being measured.
Here bf16, int8 and int4 models of the 0.8B-shape replica are loaded together and timed in turn, round after
round; each round gives a ratio per format (its time against bf16's in the same round) and the table reports
medians. Prompts longer than a chunk (512 tokens) run both ways: layer by layer (generation.prefill's default:
each layer takes every chunk before the next layer, so a quantized weight is dequantized once per prompt) and
chunk by chunk (every chunk through every layer, a quantized weight dequantized per chunk); the two give the
same logits bit for bit (tests/test_prefill_by_layer.py). Threads pinned to --threads. Prints a table, then
one JSON line. Which path quantized weights take (quant/weight.prefill_gemm: dequantize + torch's GEMM, or the
integer VNNI GEMM) depends on the machine; with oneDNN capped below AMX this machine runs what a Zen 4 runs:

    python benchmarks/bench_quant_prefill.py [--tokens 512,4096] [--rounds 5] [--threads 2]
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/bench_quant_prefill.py --tokens 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPLICA = HERE / ".cache" / "replica-0.8b"
FORMATS = ("bf16", "int8", "int4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="512,4096", help="prompt lengths, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()

    import qwen35
    import qwen35.generation as G
    from qwen35.runtime import tune_allocator

    if not (REPLICA / "config.json").is_file():
        from qwen35.commands.replica import build_replica

        build_replica(REPLICA, "0.8b")
    tune_allocator()
    torch.set_num_threads(args.threads)
    models = {f: qwen35.load_model(REPLICA, dtype=torch.bfloat16, quant=None if f == "bf16" else f) for f in FORMATS}
    lengths = [int(t) for t in args.tokens.split(",")]
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for m in models.values():  # warm-up: kernels built, allocator primed
            G.prefill(m, torch.randint(0, 240000, (1, 2 * args.chunk), generator=gen), m.make_cache(), args.chunk)
        for T in lengths:
            prompt = torch.randint(0, 240000, (1, T), generator=gen)
            modes = (True, False) if T > args.chunk else (True,)
            times = {(f, by): [] for f in FORMATS for by in modes}
            for _ in range(args.rounds):
                for by in modes:
                    G.PREFILL_BY_LAYER = by
                    for f, m in models.items():
                        cache = m.make_cache()
                        t0 = time.perf_counter()
                        G.prefill(m, prompt, cache, args.chunk)
                        times[(f, by)].append(time.perf_counter() - t0)
            G.PREFILL_BY_LAYER = True
            for (f, by), ts in times.items():
                ratios = [b / t for b, t in zip(times[("bf16", by)], ts)]
                rows.append({"tokens": T, "weights": f, "order": "layer" if by else "chunk",
                             "tok_s": round(T / statistics.median(ts), 1), "min_tok_s": round(T / max(ts), 1),
                             "max_tok_s": round(T / min(ts), 1), "vs_bf16": round(statistics.median(ratios), 3)})
    from qwen35.quant.weight import prefill_gemm

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL")
    paths = {T: prefill_gemm(min(T, args.chunk)) for T in lengths}
    print(f"prefill, 0.8B replica, {args.threads} threads, {args.rounds} rounds, chunks of {args.chunk}, "
          f"ONEDNN_MAX_CPU_ISA={isa}, quantized GEMM: " + ", ".join(f"{p} at {T}" for T, p in paths.items()))
    print(f"{'tokens':>7} {'order':<6} {'weights':<8}{'tok/s':>8}{'range':>16}{'x bf16':>9}")
    for r in rows:
        rng = f"{r['min_tok_s']:.0f}-{r['max_tok_s']:.0f}"
        print(f"{r['tokens']:>7} {r['order']:<6} {r['weights']:<8}{r['tok_s']:>8.1f}{rng:>16}{r['vs_bf16']:>9.3f}")
    print(json.dumps({"bench": "quant_prefill", "threads": args.threads, "rounds": args.rounds, "onednn_isa": isa,
                      "quant_gemm": {str(T): p for T, p in paths.items()}, "rows": rows}))


if __name__ == "__main__":
    main()
