"""qwen35 vs transformers on the Qwen3.5-0.8B shape (random weights, official layout, bf16), side by side.

Measures prefill at 512 and 4096 tokens, decode at ~1K context, and for qwen35 decode at 32K context
(the cache is filled with random keys/values and state: decode cost does not depend on their values, and
prefilling 32K tokens on 2 cores takes minutes). Each engine runs in its own subprocess; both run in this
one invocation so they see the same machine state. Prints a table, then one JSON line.

    python benchmarks/bench_engine.py [--gen 32] [--skip-transformers] [--skip-32k] [--baseline REV]

--baseline REV also runs qwen35 as of git revision REV (checked out into a temporary worktree), in the same
invocation, for before/after comparisons of a change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from baseline import checkout, run_json

HERE = Path(__file__).resolve().parent
REPLICA = HERE / ".cache" / "replica-0.8b"

QWEN35 = r"""
import json, sys, time, torch, qwen35
from qwen35.commands.bench import bytes_per_decode_token, read_bandwidth_gbs
try:
    from qwen35.generation import prefill
except ImportError:  # a --baseline revision from before the module was renamed
    from qwen35.generate import prefill
from qwen35.runtime import peak_rss_mb, tune_allocator
path, gen, do_32k = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
bw = read_bandwidth_gbs()
tune_allocator()
model = qwen35.load_model(path, dtype=torch.bfloat16)
g = torch.Generator().manual_seed(0)
res = {"read_bandwidth_gbs": bw}

def decode(cache, n):
    tok = torch.tensor([[11]])
    with torch.inference_mode():
        for _ in range(2):
            model(tok, cache=cache)
        t = time.perf_counter()
        for _ in range(n):
            tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
    return n / (time.perf_counter() - t)

with torch.inference_mode():
    prefill(model, torch.randint(0, 248044, (1, 64), generator=g), model.make_cache())  # warm-up
    for T in (512, 4096):
        ids = torch.randint(0, 248044, (1, T), generator=g)
        cache = model.make_cache()
        t = time.perf_counter()
        prefill(model, ids, cache)
        res[f"prefill_{T}_tok_s"] = T / (time.perf_counter() - t)
        if T == 512:
            prefill(model, torch.randint(0, 248044, (1, 512), generator=g), cache)  # ~1K context
            res["decode_1k_tok_s"] = decode(cache, gen)
            bw = max(bw, read_bandwidth_gbs())  # bandwidth drifts: the faster probe sets the bound
            res["read_bandwidth_gbs"] = bw
            res["bound_1k_tok_s"] = bw * 1e9 / bytes_per_decode_token(model, 1024)
    if do_32k:
        cache = model.make_cache()
        prefill(model, torch.randint(0, 248044, (1, 16), generator=g), cache)
        ctx = 32768
        for layer in cache.layers:
            if hasattr(layer, "update"):
                k = torch.randn(1, layer.num_kv_heads, ctx - 16, layer.head_dim).bfloat16()
                layer.update(k, torch.randn_like(k))
        if hasattr(cache, "advance"):
            cache.advance(ctx - 16)  # rows advance once per forward, after every layer wrote
        else:
            cache.offset = ctx  # a --baseline revision: layers advanced their own lengths
        bw32 = read_bandwidth_gbs()
        res["decode_32k_tok_s"] = decode(cache, gen)
        bw32 = max(bw32, read_bandwidth_gbs())
        res["read_bandwidth_32k_gbs"] = bw32
        res["bound_32k_tok_s"] = bw32 * 1e9 / bytes_per_decode_token(model, ctx)
        c = model.config
        res["kv_mb_32k"] = len(c.full_attention_layers) * 2 * c.num_key_value_heads * c.head_dim * 2 * ctx / 2**20
res["peak_rss_mb"] = peak_rss_mb()
print(json.dumps(res))
"""

TRANSFORMERS = r"""
import json, sys, time, torch, transformers
from qwen35.runtime import peak_rss_mb
path, gen = sys.argv[1], int(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
g = torch.Generator().manual_seed(0)
res = {}
with torch.inference_mode():
    model(torch.randint(0, 248044, (1, 64), generator=g))  # warm-up
    for T in (512, 4096):
        ids = torch.randint(0, 248044, (1, T), generator=g)
        t = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        res[f"prefill_{T}_tok_s"] = T / (time.perf_counter() - t)
        if T == 512:
            past = model(torch.randint(0, 248044, (1, 512), generator=g), past_key_values=out.past_key_values,
                         use_cache=True, logits_to_keep=1).past_key_values
            tok = torch.tensor([[11]])
            for _ in range(2):
                past = model(tok, past_key_values=past, use_cache=True).past_key_values
            t = time.perf_counter()
            for _ in range(gen):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            res["decode_1k_tok_s"] = gen / (time.perf_counter() - t)
res["peak_rss_mb"] = peak_rss_mb()
print(json.dumps(res))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gen", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-32k", action="store_true")
    ap.add_argument("--baseline", default=None, help="also run qwen35 at this git revision (e.g. HEAD~1)")
    args = ap.parse_args()
    if not (REPLICA / "config.json").is_file():
        from qwen35.commands.replica import build_replica

        build_replica(REPLICA, "0.8b")
    bench_args = (str(REPLICA), str(args.gen), "0" if args.skip_32k else "1")
    rows = {}
    if args.baseline:
        with checkout(args.baseline) as code:
            rows[f"qwen35@{args.baseline}"] = run_json(QWEN35, *bench_args, code_dir=code)
    rows["qwen35"] = run_json(QWEN35, *bench_args)
    if not args.skip_transformers:
        rows["transformers"] = run_json(TRANSFORMERS, str(REPLICA), str(args.gen))

    cols = [("prefill_512_tok_s", "prefill@512"), ("prefill_4096_tok_s", "prefill@4096"),
            ("decode_1k_tok_s", "decode@1K"), ("decode_32k_tok_s", "decode@32K"), ("peak_rss_mb", "peak MiB")]
    print(f"{'engine':<14}" + "".join(f"{c[1]:>14}" for c in cols))
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<14}failed: {r['error']}")
            continue
        print(f"{name:<14}" + "".join(f"{r[k]:>14.1f}" if k in r else f"{'-':>14}" for k, _ in cols))
    q = rows["qwen35"]
    summary = {"bench": "engine", "shape": "0.8b", "dtype": "bfloat16"}
    for name, r in rows.items():
        summary.update({f"{name.replace('@', '_at_')}_{k}": round(v, 2) for k, v in r.items()
                        if isinstance(v, (int, float))})
    if "decode_1k_tok_s" in q:
        summary["decode_1k_efficiency"] = round(q["decode_1k_tok_s"] / q["bound_1k_tok_s"], 3)
        print(f"qwen35 decode@1K: {summary['decode_1k_efficiency']:.1%} of the memory-read bound "
              f"({q['bound_1k_tok_s']:.1f} tok/s at {q['read_bandwidth_gbs']:.1f} GB/s)")
    if "decode_32k_tok_s" in q:
        summary["decode_32k_over_1k"] = round(q["decode_32k_tok_s"] / q["decode_1k_tok_s"], 3)
        print(f"qwen35 decode@32K / decode@1K: {summary['decode_32k_over_1k']:.1%} "
              f"(KV of the 6 attention layers at 32K: {q['kv_mb_32k']:.0f} MiB)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
