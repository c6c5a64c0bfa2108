"""Decode with the layer loop in one C++ call (ops/decode_stack.py) against the per-layer calls, side by side.

bf16, int8 and int4 models of the 0.8B-shape replica are loaded together; each is prefilled with the same
512-token prompt, then decode steps (one token, batch 1) are timed in rounds that alternate the two paths
on the same model and cache, so the machine's drift hits both alike. Both paths give the same logits bit for
bit (tests/test_decode_stack.py). Prints a table (median ms a token and the median of per-round ratios), then
one JSON line.

    python benchmarks/bench_decode_stack.py [--rounds 8] [--steps 20] [--threads 2] [--formats bf16,int8,int4]
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
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="decode steps per timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="bf16,int8,int4")
    args = ap.parse_args()

    import qwen35
    import qwen35.generation as G
    from qwen35.runtime import tune_allocator

    if not (REPLICA / "config.json").is_file():
        from qwen35.commands.replica import build_replica

        build_replica(REPLICA, "0.8b")
    tune_allocator()
    torch.set_num_threads(args.threads)
    formats = args.formats.split(",")
    models = {f: qwen35.load_model(REPLICA, dtype=torch.bfloat16, quant=None if f == "bf16" else f) for f in formats}
    prompt = torch.randint(0, 240000, (1, 512), generator=torch.Generator().manual_seed(0))
    token = torch.tensor([[5]])
    times: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        caches = {}
        for f, m in models.items():
            if m.decode_stack is None:
                raise SystemExit(f"{f}: no decode stack bound (kernels unavailable?)")
            caches[f] = m.make_cache()
            G.prefill(m, prompt, caches[f], 512)
            for _ in range(3):
                m(token, cache=caches[f])
        for _ in range(args.rounds):
            for f, m in models.items():
                stack = m.decode_stack
                for path in ("per layer", "stack"):
                    m.decode_stack = stack if path == "stack" else None
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        m(token, cache=caches[f])
                    times.setdefault((f, path), []).append((time.perf_counter() - t0) / args.steps)
                m.decode_stack = stack
    rows = []
    print(f"decode, 0.8B replica, 512-token prompt, {args.threads} threads, {args.rounds} rounds x {args.steps} steps")
    print(f"{'weights':<8}{'per layer ms':>14}{'stack ms':>10}{'speedup':>9}")
    for f in formats:
        a, b = times[(f, "per layer")], times[(f, "stack")]
        row = {"weights": f, "per_layer_ms": round(statistics.median(a) * 1e3, 2),
               "stack_ms": round(statistics.median(b) * 1e3, 2),
               "speedup": round(statistics.median([x / y for x, y in zip(a, b)]), 3)}
        rows.append(row)
        print(f"{f:<8}{row['per_layer_ms']:>14.2f}{row['stack_ms']:>10.2f}{row['speedup']:>9.3f}")
    print(json.dumps({"bench": "decode_stack", "threads": args.threads, "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()
