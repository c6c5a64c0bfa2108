"""262,144-token context: memory that scales with 1 layer in 4, and an actual long run.

Part 1 (Qwen3.5-0.8B shape, all 24 layers): KV bytes per token of the 6 attention layers and the Gated
DeltaNet state, measured on real caches after 1K and 4K tokens (the state must not grow), and the
resulting plan for 262,144 tokens.

Part 2 (an actual run): a reduced-depth model with the 0.8B layer shapes — 4 layers, 3 Gated DeltaNet +
1 gated attention (the full model would need hours of attention compute on 2 cores) — prefills 262,144
tokens in chunks, then decodes at that depth. Reports time, tokens/s, peak RSS, KV and state sizes.

    python benchmarks/bench_long_context.py [--tokens 262144] [--chunk 4096] [--skip-run]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--skip-run", action="store_true")
    args = ap.parse_args()

    import qwen35
    from qwen35.commands.replica import build_replica
    from qwen35.generation import prefill
    from qwen35.runtime import current_rss_mb, peak_rss_mb, tune_allocator

    tune_allocator()
    full = HERE / ".cache" / "replica-0.8b"
    if not (full / "config.json").is_file():
        build_replica(full, "0.8b")
    model = qwen35.load_model(full, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    sizes = {}
    cache = model.make_cache()
    done = 0
    for target in (1024, 4096):
        prefill(model, torch.randint(0, 248044, (1, target - done), generator=g), cache)
        done = target
        kv = sum(layer.nbytes for i, layer in enumerate(cache.layers) if i in model.config.full_attention_layers)
        state = sum(layer.nbytes for i, layer in enumerate(cache.layers) if i not in model.config.full_attention_layers)
        sizes[target] = (kv, state)
    kv_per_token = (sizes[4096][0] - sizes[1024][0]) / 3072
    state_bytes = sizes[4096][1]
    assert sizes[1024][1] == sizes[4096][1], "Gated DeltaNet state grew with the context"
    result = {
        "bench": "long_context", "kv_bytes_per_token_0p8b": kv_per_token, "deltanet_state_mb_0p8b": state_bytes / 2**20,
        "kv_gib_at_262144_0p8b": kv_per_token * 262144 / 2**30,
    }
    print("Qwen3.5-0.8B shape, bf16 (24 layers: 18 Gated DeltaNet, 6 gated attention)")
    print(f"  KV per token (6 attention layers): {kv_per_token / 1024:.1f} KiB")
    print(f"  Gated DeltaNet state: {state_bytes / 2**20:.1f} MiB at 1K and at 4K tokens (constant)")
    print(f"  planned for 262,144 tokens: KV {result['kv_gib_at_262144_0p8b']:.2f} GiB + state "
          f"{state_bytes / 2**20:.1f} MiB + weights {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30:.2f} GiB")
    del model, cache

    if not args.skip_run:
        small = HERE / ".cache" / "replica-0.8b-4layers"
        if not (small / "config.json").is_file():
            build_replica(small, "0.8b", layers=4)
        model = qwen35.load_model(small, dtype=torch.bfloat16)
        cache = model.make_cache()
        rss_before = current_rss_mb()
        ids = torch.randint(0, 248044, (1, args.tokens), generator=g)
        print(f"\nactual run: 0.8B shape reduced to 4 layers (3 Gated DeltaNet + 1 attention), "
              f"{args.tokens} tokens in chunks of {args.chunk}")
        print(f"{'tokens':>9}{'elapsed s':>11}{'tok/s (chunk)':>15}{'KV MiB':>9}{'state MiB':>11}{'RSS MiB':>9}")
        t0 = time.perf_counter()
        logits = None
        with torch.inference_mode():
            for start in range(0, args.tokens, args.chunk):
                t = time.perf_counter()
                end = min(args.tokens, start + args.chunk)
                logits = model(ids[:, start:end], cache=cache, logits_to_keep=1)[:, -1]
                if (end // args.chunk) % 8 == 0 or end == args.tokens:
                    kv = cache.layers[3].nbytes
                    state = sum(cache.layers[i].nbytes for i in range(3))
                    print(f"{end:>9}{time.perf_counter() - t0:>11.1f}{(end - start) / (time.perf_counter() - t):>15.1f}"
                          f"{kv / 2**20:>9.0f}{state / 2**20:>11.2f}{current_rss_mb():>9.0f}", flush=True)
            prefill_s = time.perf_counter() - t0
            tok = logits.argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(args.decode):
                tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
            decode_tok_s = args.decode / (time.perf_counter() - t)
        result.update({
            "run_model": "0.8b shape, 4 layers (3 GDN + 1 attention)", "run_tokens": args.tokens,
            "run_prefill_s": round(prefill_s, 1), "run_prefill_tok_s": round(args.tokens / prefill_s, 1),
            "run_decode_tok_s_at_end": round(decode_tok_s, 2), "run_kv_mb": round(cache.layers[3].nbytes / 2**20, 1),
            "run_state_mb": round(sum(cache.layers[i].nbytes for i in range(3)) / 2**20, 2),
            "run_rss_mb_at_end": round(current_rss_mb(), 1), "run_rss_mb_after_load": round(rss_before, 1),
            "process_peak_rss_mb": round(peak_rss_mb(), 1), "run_finite": bool(torch.isfinite(logits).all()),
        })
        print(f"prefill {prefill_s:.0f}s ({args.tokens / prefill_s:.0f} tok/s); decode at {args.tokens + args.decode} "
              f"tokens: {decode_tok_s:.2f} tok/s; RSS {current_rss_mb():.0f} MiB (after load {rss_before:.0f})")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
