"""The 8-bit KV cache: decode speed at long context, memory, and KL against the bf16 KV cache.

Speed: the Qwen3.5-0.8B-shape replica with int4 weights (bf16 activations, whole-layer kernels, as users run
it), one sequence whose cache holds 4K, 32K or 128K tokens, decoding greedily with a bf16 KV cache and with a
q8_0 one side by side (A/B alternated, `--reps` times each; the best of each is reported). The cache is filled
synthetically (random keys and values, written through the cache's own write path, so q8_0 keys are
quantized as a prefill would): prefilling 128K tokens on 2 cores takes ~15 minutes per format, and decode
time does not depend on what the keys hold. Memory: the KV bytes each cache holds and the process's RSS.

Prefill (`--prefill-contexts`): one prompt chunk (512 tokens) written into one attention layer of the 0.8B shape
(8 query / 2 KV heads of 256) and attended over a prefix of P tokens, as GatedAttention.forward does it: bf16
KV; q8_0 KV (the int8 blocks read in place by prefill_attn_q8, or a block of keys at a time by the torch form);
and q8_0 the way it was before (KVCache.update dequantizing the whole prefix, then the bf16 attention). Each
in its own process (a fresh heap, so the peak counts every allocation): ms per chunk (best of `--reps`,
processes A/B-alternated) and the peak resident memory above what the process held before the chunk.

Quality: mean KL of the next-token distributions, q8_0 KV against bf16 KV (same weights, both bf16
activations), per position bucket, the two caches run in lockstep chunk by chunk (prefill attention over a
q8_0 cache reads its quantized keys and values, so every position sees quantized keys and values of all
earlier ones):
- on the bundled model (trained: its distributions mean something) over held-out Python source text;
- on the 0.8B replica with int4 weights (random weights: flat distributions, so its absolute KL is not a
  quality number; a KL that grows with position would show error compounding).

    python benchmarks/bench_kv_cache.py [--contexts 4096,32768,131072] [--kl-tokens 32768]
        [--replica-kl-tokens 8192] [--skip-speed] [--skip-kl] [--prefill-contexts 65536,131072] [--torch]

Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
REPLICA = HERE / ".cache" / "replica-0.8b"
EDGES = [0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
FORMATS = ("bf16", "q8_0")


def replica():
    if not (REPLICA / "config.json").is_file():
        from qwen35.commands.replica import build_replica

        build_replica(REPLICA, "0.8b")
    return REPLICA


def filled_cache(model, kv_cache: str, n: int, room: int):
    """A one-row cache holding n synthetic tokens (keys ~ N(0, 1) like normed keys, values ~ N(0, 1)), with
    room for `room` more; written through each buffer's write path in slices."""
    from qwen35.cache import KVCache

    cache = model.make_cache(kv_cache=kv_cache)
    cache.reserve(n + room)
    gen = torch.Generator().manual_seed(n)
    for layer in cache.layers:
        if isinstance(layer, KVCache):
            buf = cache.rows[0].kv[layer.j]
            for s in range(0, n, 8192):
                m = min(8192, n - s)
                k = torch.randn(layer.num_kv_heads, m, layer.head_dim, generator=gen).bfloat16()
                v = torch.randn(layer.num_kv_heads, m, layer.head_dim, generator=gen).bfloat16()
                buf.write(s, k, v)
    cache.rows[0].length = n
    return cache


def decode_tok_s(model, cache, steps: int) -> float:
    """Greedy decode `steps` tokens from the cache's position (after one untimed step); the cache is left
    where it was (snapshot / restore)."""
    snap = cache.snapshot()
    tok = torch.tensor([[1]])
    with torch.inference_mode():
        tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
        dt = time.perf_counter() - t0
    cache.restore(snap)
    return steps / dt


def speed(contexts: list[int], steps: int, reps: int) -> dict:
    import qwen35
    from qwen35.runtime import current_rss_mb

    model = qwen35.load_model(replica(), dtype=torch.bfloat16, quant="int4", kernels=True)
    out = {"model": "0.8b replica, int4 weights, bf16 activations, kernels on", "steps": steps, "rows": []}
    print(f"\ndecode, one sequence, {steps} tokens per run, best of {reps} A/B-alternated runs "
          f"(load {os.getloadavg()[0]:.2f})")
    print(f"{'context':>8}{'bf16 tok/s':>12}{'q8_0 tok/s':>12}{'speedup':>9}{'KV bf16 MiB':>13}"
          f"{'KV q8_0 MiB':>13}{'RSS MiB':>9}")
    for n in contexts:
        caches = {f: filled_cache(model, f, n, steps + 2) for f in FORMATS}
        best = {f: 0.0 for f in FORMATS}
        for _ in range(reps):
            for f in FORMATS:
                best[f] = max(best[f], decode_tok_s(model, caches[f], steps))
        kv = {f: sum(layer.nbytes for layer in caches[f].layers if hasattr(layer, "kv_cache")) / 2**20
              for f in FORMATS}
        row = {"context": n, **{f"{f}_tok_s": round(best[f], 2) for f in FORMATS},
               "speedup": round(best["q8_0"] / best["bf16"], 3),
               **{f"kv_{f}_mib": round(kv[f], 1) for f in FORMATS},
               "rss_mib": round(current_rss_mb(), 0), "load_avg": round(os.getloadavg()[0], 2)}
        out["rows"].append(row)
        print(f"{n:>8}{best['bf16']:>12.2f}{best['q8_0']:>12.2f}{row['speedup']:>8.2f}x{kv['bf16']:>13.1f}"
              f"{kv['q8_0']:>13.1f}{row['rss_mib']:>9.0f}   (load {row['load_avg']:.2f})", flush=True)
        del caches
    return out


PREFILL_FORMS = ("bf16", "q8_0", "q8_0 whole prefix")
CHUNK = 512


def prefill_chunk(form: str, P: int, reps: int, kernels_on: bool) -> dict:
    """One chunk's write and attention over a P-token prefix in one attention layer, `reps` times (each time
    over the same prefix: the row's length is not advanced): best ms and the peak RSS rise above the process
    before the first chunk (the layer's buffers already allocated and filled)."""
    from qwen35.cache import CacheLayout, HybridCache
    from qwen35.model.attention import GatedAttention
    from qwen35.runtime import current_rss_mb, peak_rss_mb, reset_peak_rss

    Hq, Hkv, D = 8, 2, 256
    config = SimpleNamespace(num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D, hidden_size=64,
                             rms_norm_eps=1e-6)
    attn = GatedAttention(config)
    if kernels_on:
        from qwen35.ops import kernels
        from qwen35.ops.step_forms import prefill_attention, prefill_attention_q8

        assert kernels.available(), kernels.unavailable_reason()
        attn.prompt_attention, attn.prompt_attention_q8 = prefill_attention, prefill_attention_q8
    fmt = form.split()[0]
    cache = HybridCache.empty(CacheLayout(["full_attention"], Hkv, D, dtype=torch.bfloat16, kv_cache=fmt), 1)
    cache.reserve(P + CHUNK, exact=True)
    layer, gen = cache.layers[0], torch.Generator().manual_seed(P)
    for s in range(0, P, 8192):
        m = min(8192, P - s)
        layer.append(*(torch.randn(1, Hkv, m, D, generator=gen).bfloat16() for _ in range(2)))
        cache.advance(m)
    q = torch.randn(1, Hq, CHUNK, D, generator=gen).bfloat16()
    k, v = (torch.randn(1, Hkv, CHUNK, D, generator=gen).bfloat16() for _ in range(2))
    scale = D**-0.5

    def chunk():
        if form == "q8_0":
            return attn._attend_q8(q, k, v, layer, scale)  # what GatedAttention.forward runs over a q8_0 cache
        (kb, vb), = layer.update(k, v)  # the bf16 cache's path, and the q8_0 one's before (dequantized whole)
        return attn.prompt_attention(q, kb, vb, P, scale)

    with torch.inference_mode():
        base = current_rss_mb()
        reset_peak_rss()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            chunk()
            best = min(best, time.perf_counter() - t0)
        peak = peak_rss_mb() - base
    return {"form": form, "prefix": P, "ms": round(best * 1000, 1), "peak_mib": round(peak, 1),
            "kv_mib": round(cache.allocated_bytes / 2**20, 1)}


def prefill(contexts: list[int], reps: int, kernels_on: bool) -> dict:
    """prefill_chunk for each form and prefix, each in its own process, the forms alternated `reps` times."""
    rows: dict = {}
    for P in contexts:
        for _ in range(reps):
            for form in PREFILL_FORMS:
                cmd = [sys.executable, __file__, "--one-chunk", form, str(P), "--reps", "2"]
                r = json.loads(subprocess.run(cmd + (["--torch"] if not kernels_on else []), check=True,
                                              capture_output=True, text=True).stdout.splitlines()[-1])
                old = rows.setdefault((P, form), r)
                old["ms"], old["peak_mib"] = min(old["ms"], r["ms"]), max(old["peak_mib"], r["peak_mib"])
    forms = "kernels (prefill_attn / prefill_attn_q8)" if kernels_on else "torch forms"
    print(f"\nprefill, one {CHUNK}-token chunk into one attention layer (8 / 2 heads x 256) over a prefix, "
          f"{forms}, best ms of {reps} processes x 2 chunks, peak RSS rise (load {os.getloadavg()[0]:.2f})")
    print(f"{'prefix':>8}{'form':>20}{'ms':>9}{'peak MiB':>10}{'KV MiB':>9}")
    for r in rows.values():
        print(f"{r['prefix']:>8}{r['form']:>20}{r['ms']:>9.1f}{r['peak_mib']:>10.1f}{r['kv_mib']:>9.1f}")
    return {"kernels": kernels_on, "chunk": CHUNK, "rows": list(rows.values())}


def heldout_ids(tok, n: int) -> torch.Tensor:
    """n tokens of the standard library's source, every 20th file (the split the bundled model never saw)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    ids: list[int] = []
    for f in files[::20]:
        ids += tok.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= n:
            break
    return torch.tensor([ids[:n]])


def kl_by_position(model, ids: torch.Tensor, chunk: int) -> dict:
    """Mean KL(bf16 KV || q8_0 KV) of next-token distributions per position bucket, caches in lockstep."""
    T = ids.shape[1]
    caches = {f: model.make_cache(kv_cache=f) for f in FORMATS}
    edges = [e for e in EDGES if e < T] + [T]
    sums, counts, agree = [0.0] * (len(edges) - 1), [0] * (len(edges) - 1), [0.0] * (len(edges) - 1)
    worst = 0.0
    with torch.inference_mode():
        for s in range(0, T, chunk):
            x = ids[:, s : s + chunk]
            lp, lq = (model(x, cache=caches[f])[0].float().log_softmax(-1) for f in FORMATS)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            same = (lp.argmax(-1) == lq.argmax(-1)).float()
            worst = max(worst, float(kl.max()))
            bucket = torch.bucketize(torch.arange(s, s + x.shape[1]), torch.tensor(edges[1:]), right=True)
            for b in range(len(counts)):
                sel = bucket == b
                sums[b] += float(kl[sel].sum())
                agree[b] += float(same[sel].sum())
                counts[b] += int(sel.sum())
    labels = [f"{edges[i]}-{edges[i + 1]}" for i in range(len(counts))]
    return {"tokens": T, "buckets": labels, "kl": [sums[b] / max(counts[b], 1) for b in range(len(counts))],
            "greedy_agreement": [agree[b] / max(counts[b], 1) for b in range(len(counts))],
            "mean_kl": sum(sums) / T, "max_kl": worst}


def print_kl(title: str, r: dict) -> None:
    print(f"\n{title}: mean KL {r['mean_kl']:.6f} over {r['tokens']} tokens (max {r['max_kl']:.4f}); "
          "per bucket:")
    print("".join(f"{b:>13}" for b in r["buckets"]))
    print("".join(f"{k:>13.6f}" for k in r["kl"]) + "   mean KL")
    print("".join(f"{a:>13.4f}" for a in r["greedy_agreement"]) + "   greedy agreement")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--kl-tokens", type=int, default=32768, help="bundled model, held-out text")
    ap.add_argument("--replica-kl-tokens", type=int, default=8192, help="0.8B replica, int4, random tokens")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-kl", action="store_true")
    ap.add_argument("--prefill-contexts", default="", help="e.g. 65536,131072: one prefill chunk over them")
    ap.add_argument("--torch", action="store_true", help="prefill: the torch forms, not the kernels")
    ap.add_argument("--one-chunk", nargs=2, metavar=("FORM", "PREFIX"), help=argparse.SUPPRESS)  # (a child)
    args = ap.parse_args()
    if args.one_chunk:
        print(json.dumps(prefill_chunk(args.one_chunk[0], int(args.one_chunk[1]), args.reps, not args.torch)))
        return
    import qwen35
    from qwen35.runtime import peak_rss_mb

    result: dict = {"bench": "kv_cache", "threads": torch.get_num_threads(),
                    "load_avg_start": os.getloadavg()[0]}
    if args.prefill_contexts:
        result["prefill"] = prefill([int(c) for c in args.prefill_contexts.split(",")], args.reps, not args.torch)
    if not args.skip_speed:
        result["speed"] = speed([int(c) for c in args.contexts.split(",")], args.steps, args.reps)
    if not args.skip_kl:
        from qwen35.commands.common import default_model

        model, tok = qwen35.load(default_model(), dtype=torch.bfloat16, kernels=True)
        r = kl_by_position(model, heldout_ids(tok, args.kl_tokens), args.chunk)
        print_kl("bundled model (trained), held-out stdlib source, q8_0 KV vs bf16 KV", r)
        result["kl_bundled"] = r
        if args.replica_kl_tokens:
            m = qwen35.load_model(replica(), dtype=torch.bfloat16, quant="int4", kernels=True)
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 248044, (1, args.replica_kl_tokens), generator=gen)
            r = kl_by_position(m, ids, args.chunk)
            print_kl("0.8B replica (random weights), int4, random tokens, q8_0 KV vs bf16 KV", r)
            result["kl_replica_int4"] = r
    result["peak_rss_mib"] = round(peak_rss_mb(), 0)
    result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
