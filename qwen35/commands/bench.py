"""Measure prefill and decode speed and peak memory on a random prompt (fixed seed).

Decode is compared with the memory-read bound of this machine: bytes streamed per token (every weight
the step reads, plus KV and Gated DeltaNet state) divided by the measured read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .common import DTYPES, POSITIVE, SEED


def setup_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--prompt-tokens", type=POSITIVE, default=512)
    p.add_argument("--gen-tokens", type=POSITIVE, default=64,
                   help="tokens to generate (default 64); the first comes from the prefill, so decode speed needs "
                        "2 or more: with 1, the decode fields are null in --json")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--threads", type=POSITIVE, default=None,
                   help="intra-op threads, pinned (default: one per core, adapting per step as generate does)")
    p.add_argument("--prefill-chunk", type=POSITIVE, default=512, help="prefill chunk size in tokens")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                   help="C++ CPU kernels: auto = qwen35.kernel_policy, the choice generate/chat/serve make")
    from .common import add_kv_cache_arg, add_mmproj_arg, add_quant_arg

    add_quant_arg(p)
    add_kv_cache_arg(p)
    add_mmproj_arg(p)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    from .common import add_speculative_args

    add_speculative_args(p)


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports (0 if it says nothing)."""
    from pathlib import Path

    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip()
            best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError):
            continue
    return best


def probe_bytes() -> int:
    """A read-bandwidth buffer far larger than the caches: 4x the last-level cache (some hosts here report
    480 MiB of L3: a 256 MiB probe read cached lines at 57 GB/s while decode streamed memory at 22), at least
    512 MiB, at most a quarter of the memory available."""
    from ..memory import available_bytes

    want = max(512 * 2**20, 4 * last_level_cache_bytes())
    avail = available_bytes()
    return want if avail is None else int(min(want, max(512 * 2**20, avail // 4)))


def read_bandwidth_gbs(nbytes: int | None = None, repeats: int = 5) -> float:
    """Median read bandwidth over a buffer far larger than the caches (a sum over int64 words; probe_bytes()
    by default), the buffer in the same kind of pages as the weights (see runtime.WeightArena), so the bound
    compares like with like."""
    from ..runtime import WeightArena

    nbytes = nbytes or probe_bytes()
    buf = WeightArena(nbytes).take((nbytes // 8,), torch.int64)
    buf.fill_(1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    del buf
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def bytes_per_decode_token(model, context: int) -> int:
    """Weights read by one decode step (the MTP head is not run; an untied embedding is only looked up,
    a tied one is read whole as the head), plus the KV and Gated DeltaNet state it touches."""
    total = 0
    for name, w in model.named_weights():  # parameters and quantized weight objects, each once
        if name.startswith("mtp."):
            continue
        if name == "model.embed_tokens.weight" and model.lm_head is not None:
            continue
        total += w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
    c = model.config
    from ..kv_storage import kv_bytes_per_token

    kv = len(c.full_attention_layers) * kv_bytes_per_token(model.kv_cache, c.num_key_value_heads, c.head_dim,
                                                            model.dtype) * context
    state = len(c.linear_attention_layers) * c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4
    return total + kv + 2 * state  # the recurrent state is read and written


def main(args: argparse.Namespace) -> int:
    import qwen35
    from qwen35 import threads as governor
    from qwen35.generation import generate_step, max_context

    from .common import check_quant_flag, check_speculative_flags, speculation_from_args

    check_speculative_flags(args)
    check_quant_flag(args.model, args.quant)
    from qwen35.runtime import peak_rss_mb, reset_peak_rss, set_threads, tune_allocator

    threads = set_threads(args.threads)
    if args.threads is None:  # bench what generate runs
        governor.enable(threads)
    bw = read_bandwidth_gbs()  # before the model exists; its buffer (GBs) is then taken out of the peak
    reset_peak_rss()
    tune_allocator()
    t0 = time.perf_counter()
    kernels = {"auto": None, "on": True, "off": False}[args.kernels]
    model = qwen35.load_model(args.model, dtype=DTYPES[args.dtype], kernels=kernels, quant=args.quant,
                              kv_cache=args.kv_cache, mmproj=args.mmproj)
    load_s = time.perf_counter() - t0
    # before the random prompt is built: a billion-token list alone is tens of GB
    if args.prompt_tokens + args.gen_tokens > max_context(model):
        raise qwen35.ContextLengthError(
            f"--prompt-tokens {args.prompt_tokens} + --gen-tokens {args.gen_tokens} = "
            f"{args.prompt_tokens + args.gen_tokens} exceeds the context of {max_context(model)} tokens; lower them")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, min(vocab, 248044), (args.prompt_tokens,), generator=gen).tolist()
    params = qwen35.SamplingParams(temperature=0, max_tokens=args.gen_tokens)

    spec = speculation_from_args(args)
    # warm-up: builds the kernels once and touches every weight, outside the timings
    for _ in generate_step(model, prompt[:8], params=qwen35.SamplingParams(temperature=0, max_tokens=6),
                           speculative=spec):
        pass

    cache = model.make_cache()
    steps = generate_step(model, prompt, cache=cache, params=params, prefill_chunk_size=args.prefill_chunk,
                          speculative=spec)
    t0 = time.perf_counter()
    next(steps)
    t1 = time.perf_counter()
    n = 1
    for _ in steps:
        n += 1
    t2 = time.perf_counter()
    prefill_tok_s = args.prompt_tokens / (t1 - t0)
    decode_tok_s = (n - 1) / (t2 - t1) if n > 1 else None  # one token: no decode step to time
    per_token = bytes_per_decode_token(model, args.prompt_tokens + args.gen_tokens // 2)
    peak = peak_rss_mb()
    # The machine's read bandwidth drifts (a shared host: 31-54 GB/s seen within one hour), so it is probed
    # before the model loads and again right after decode, and the bound uses the faster of the two.
    bw = max(bw, read_bandwidth_gbs())
    bound = bw * 1e9 / per_token
    efficiency = decode_tok_s / bound if decode_tok_s is not None else None

    def maybe(v: float | None, digits: int) -> float | None:  # null in --json where nothing was measured
        return round(v, digits) if v is not None else None

    result = {
        "model": str(args.model), "dtype": args.dtype, "threads": threads, "prompt_tokens": args.prompt_tokens,
        "gen_tokens": n, "load_s": round(load_s, 3), "prefill_tok_s": round(prefill_tok_s, 2),
        "decode_tok_s": maybe(decode_tok_s, 2), "peak_rss_mb": round(peak, 1),
        "read_bandwidth_gbs": round(bw, 2), "bytes_per_token_mb": round(per_token / 2**20, 1),
        "decode_bound_tok_s": round(bound, 2), "decode_efficiency": maybe(efficiency, 3),
        "cache_mb": round(cache.nbytes / 2**20, 1), "kernels": kernels_in_use(model), "quant": args.quant,
        "adaptive_threads": governor.governor().summary() if governor.governor() else None,
        "kv_cache": args.kv_cache,
    }
    if spec is not None:  # a random prompt: acceptance here says little; benchmarks/bench_speculative.py does
        result["speculative"] = spec.last.as_dict()
    if args.quant:  # which path a prompt chunk's quantized matrices took here (quant/weight.prefill_gemm)
        from qwen35.quant.weight import GEMV_MAX_ROWS, prefill_gemm

        rows = min(args.prompt_tokens, args.prefill_chunk)
        scheme = {"int8": "q8_0", "int4": "q4_k"}.get(args.quant, args.quant)  # the policy's main layout
        result["quant_prefill_gemm"] = prefill_gemm(rows, scheme) if rows > GEMV_MAX_ROWS else "gemv"
    print(f"model {args.model} ({args.dtype}, {threads} threads, kernels {result['kernels']}, "
          f"KV cache {args.kv_cache}"
          + (f", {args.quant} prefill {result['quant_prefill_gemm']}" if args.quant else "")
          + f"), loaded in {load_s:.2f}s")
    print(f"{'prompt':>8}{'gen':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'bound tok/s':>13}{'efficiency':>12}"
          f"{'peak RSS MiB':>14}")
    decode = f"{decode_tok_s:>14.2f}" if decode_tok_s is not None else f"{'-':>14}"
    share = f"{efficiency:>12.1%}" if efficiency is not None else f"{'-':>12}"
    print(f"{args.prompt_tokens:>8}{n:>6}{prefill_tok_s:>15.1f}{decode}{bound:>13.2f}{share}"
          f"{result['peak_rss_mb']:>14.0f}")
    print(f"memory read bandwidth {bw:.1f} GB/s; {per_token / 2**20:.0f} MiB streamed per decoded token")
    if spec is not None:
        print(spec.last.summary())
    if args.json:
        print(json.dumps(result))
    return 0


def kernels_in_use(model) -> str:
    """"on" (the AVX512 kernels bound), "portable" (quantized matrices on the portable kernels only: a CPU
    without AVX512, or QWEN35_KERNELS=portable) or "off"."""
    from qwen35.ops import kernels
    from qwen35.ops.fast import quantized_weights

    if model.kernels and kernels.available():
        return "on"
    return "portable" if any(w.portable for w in quantized_weights(model)) else "off"
