"""Prompt-chunk attention: the kernel (kernels/prefill_attn.cpp, `prefill_attn`) against the reference form it
replaces (ops/attention.prompt_attention: torch's CPU flash attention over the cached keys merged with the
chunk's own causal part), side by side in one process, alternating call by call:
- the op alone: one chunk of 512 queries (8 heads over 2 KV heads of 256, the 0.8B-9B attention shape) over
  `--pasts` cached keys, GFLOP/s of the causal products (2 x 2 x queries x keys seen x D);
- the 0.8B replica's whole prefill of `--tokens` prompts (bf16 or `--quant`), its attention layers switched
  between the two forms round after round.

    python benchmarks/bench_prefill_attn.py [--pasts 0,512,3584,15872] [--tokens 512,4096] [--quant int4]
        [--rounds 3]

Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPLICA = HERE / ".cache" / "replica-0.8b"


def best_of(fns: dict, rounds: int) -> dict:
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pasts", default="0,512,3584,15872")
    ap.add_argument("--tokens", default="512,4096")
    ap.add_argument("--quant", default="int4", help="weights of the model runs: bf16 or a scheme")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    from qwen35.ops import kernels
    from qwen35.ops.attention import prompt_attention

    if not kernels.available():
        raise SystemExit(f"the AVX512 kernels are unavailable here: {kernels.unavailable_reason()}")
    Hkv, G, D, T = 2, 4, 256, 512
    print(f"op: {T} queries, {Hkv * G} heads over {Hkv} KV heads of {D}, {args.threads} threads")
    print(f"{'past':>7} {'kernel ms':>10} {'GFLOP/s':>8} {'torch ms':>9} {'GFLOP/s':>8} {'speedup':>8}")
    op_rows = []
    for past in (int(p) for p in args.pasts.split(",")):
        gen = torch.Generator().manual_seed(past)
        S = past + T
        q = torch.randn(1, Hkv * G, T, D, generator=gen).bfloat16()
        k = torch.randn(1, Hkv, S, D, generator=gen).bfloat16()
        v = torch.randn(1, Hkv, S, D, generator=gen).bfloat16()
        best = best_of({"kernel": partial(torch.ops.qwen35.prefill_attn, q[0], k[0], v[0], past, D**-0.5),
                        "torch": partial(prompt_attention, q, k, v, past, D**-0.5)}, args.rounds)
        flop = 2 * 2 * Hkv * G * T * (past + (T + 1) / 2) * D
        row = {"past": past, "kernel_ms": round(best["kernel"] * 1e3, 2), "torch_ms": round(best["torch"] * 1e3, 2),
               "speedup": round(best["torch"] / best["kernel"], 3)}
        op_rows.append(row)
        print(f"{past:>7} {row['kernel_ms']:>10.2f} {flop / best['kernel'] / 1e9:>8.0f} {row['torch_ms']:>9.2f} "
              f"{flop / best['torch'] / 1e9:>8.0f} {row['speedup']:>7.2f}x")

    import qwen35
    from qwen35.commands.replica import build_replica
    from qwen35.generation import prefill
    from qwen35.model.attention import GatedAttention

    if not (REPLICA / "config.json").is_file():
        build_replica(REPLICA, "0.8b")
    kw = {} if args.quant == "bf16" else {"quant": args.quant}
    model = qwen35.load_model(REPLICA, dtype=torch.bfloat16, kernels=True, **kw)
    attn = [m for m in model.modules() if isinstance(m, GatedAttention)]
    bound = attn[0].prompt_attention
    assert bound is not prompt_attention, "prefill_attn is not bound on this machine (AMX: torch's is kept)"

    def form(f):
        for m in attn:
            m.prompt_attention = f

    print(f"\n0.8B replica, {args.quant} weights, whole prefill (chunks of 512), best of {args.rounds} alternating")
    print(f"{'tokens':>7} {'kernel tok/s':>13} {'torch tok/s':>12} {'speedup':>8}")
    model_rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        fns = {}
        for name, f in (("kernel", bound), ("torch", prompt_attention)):
            def run(f=f, ids=ids):
                form(f)
                prefill(model, ids, model.make_cache())
            fns[name] = run
        best = best_of(fns, args.rounds)
        row = {"tokens": n, "kernel_tok_s": round(n / best["kernel"], 1), "torch_tok_s": round(n / best["torch"], 1),
               "speedup": round(best["torch"] / best["kernel"], 3)}
        model_rows.append(row)
        print(f"{n:>7} {row['kernel_tok_s']:>13.1f} {row['torch_tok_s']:>12.1f} {row['speedup']:>7.2f}x")
    form(bound)
    print(json.dumps({"bench": "prefill_attn", "threads": args.threads, "quant": args.quant, "op": op_rows,
                      "model": model_rows}))


if __name__ == "__main__":
    main()
