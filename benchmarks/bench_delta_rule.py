"""The gated delta rule's kernel (ops/kernels/delta_rule.h) against the chunked torch form, side by side in one
process: the op alone on one 0.8B layer's shape (16 heads of 128), then the 0.8B replica's whole prefill with
its Gated DeltaNet layers switched between the two forms round after round (the machine's drift hits both).
Which library's kernel runs follows the machine (the AVX512 one's `delta_rule`, else `portable_delta_rule`;
QWEN35_KERNELS=portable QWEN35_PORTABLE_MARCH=x86-64-v3 holds it to an AVX2 laptop's build):

    python benchmarks/bench_delta_rule.py [--tokens 16,64,512,2048] [--formats bf16,int4] [--rounds 4]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPLICA = HERE / ".cache" / "replica-0.8b"


def best_of(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16,64,512,2048")
    ap.add_argument("--formats", default="bf16,int4")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)

    import torch.nn.functional as F

    import qwen35
    import qwen35.generation as G
    from qwen35.model.deltanet import GatedDeltaNet
    from qwen35.ops import fast, kernels
    from qwen35.ops.gated_delta import chunk_gated_delta_rule, gated_delta_rule
    from qwen35.runtime import tune_allocator

    tune_allocator()
    if kernels.available():
        kernel = fast.delta_rule
    elif kernels.portable_available():  # builds and loads the portable library
        kernel = fast.portable_delta_rule
    else:
        raise SystemExit(f"no kernels here: {kernels.unavailable_reason()}; {kernels.portable_reason()}")
    lengths = [int(t) for t in args.tokens.split(",")]
    rows, out = [], {"kernel": kernel.__name__, "op_ms": {}, "prefill_tok_s": {}}
    gen = torch.Generator().manual_seed(0)
    for T in lengths:
        B, H, D = 1, 16, 128
        q = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1) * D**-0.5
        k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
        v = torch.randn(B, T, H, D, generator=gen)
        g, beta, s = -torch.rand(B, T, H, generator=gen) * 0.5, torch.rand(B, T, H, generator=gen), torch.zeros(B, H, D, D)
        times = {"kernel": [], "chunk": []}
        for _ in range(3 * args.rounds):  # alternating
            times["kernel"].append(best_of(lambda: kernel(q, k, v, g, beta, s), 1))
            times["chunk"].append(best_of(lambda: chunk_gated_delta_rule(q, k, v, g, beta, s), 1))
        a, c = min(times["kernel"]) * 1e3, min(times["chunk"]) * 1e3
        rows.append(f"| op, one layer | {T} | {c:.2f} ms | {a:.2f} ms | {c / a:.2f}x |")
        out["op_ms"][T] = {"chunk": round(c, 3), "kernel": round(a, 3)}

    if not (REPLICA / "config.json").is_file():
        from qwen35.commands.replica import build_replica

        build_replica(REPLICA, "0.8b")
    for fmt in args.formats.split(","):
        model = qwen35.load_model(REPLICA, dtype=torch.bfloat16, quant=None if fmt == "bf16" else fmt)
        mixers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
        for T in lengths:
            prompt = torch.randint(0, 240000, (1, T), generator=gen)
            times = {"chunk": [], "kernel": []}
            for r in range(args.rounds if T < 2048 else max(2, args.rounds // 2)):
                for name, form in (("chunk", gated_delta_rule), ("kernel", kernel)):
                    for m in mixers:
                        m.delta_rule = form
                    if r == 0:
                        G.prefill(model, prompt, model.make_cache(), 512)  # warm-up
                    times[name].append(best_of(lambda: G.prefill(model, prompt, model.make_cache(), 512), 1))
            for m in mixers:
                m.delta_rule = kernel
            c, a = T / min(times["chunk"]), T / min(times["kernel"])
            rows.append(f"| prefill, 0.8B {fmt} | {T} | {c:.1f} tok/s | {a:.1f} tok/s | {a / c:.2f}x |")
            out["prefill_tok_s"][f"{fmt}@{T}"] = {"chunk": round(c, 1), "kernel": round(a, 1)}
        del model

    print(f"gated delta rule: chunked torch form vs {kernel.__name__} ({args.threads} threads)\n")
    print("| what | tokens | chunked | kernel | speed-up |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
