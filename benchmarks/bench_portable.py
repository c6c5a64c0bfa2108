"""Quantized and bf16 weights on a CPU without AVX512-BF16 / VNNI (an AVX2 laptop): the portable kernels
(ops/kernels/portable_kernels.cpp) against the AVX512 ones, GEMV by GEMV, and whole models prefilling and decoding.

Such a CPU is emulated on this one: `--march x86-64-v3` builds the portable kernels for an AVX2 laptop's
instruction set (Haswell through Alder Lake / Zen 3), `native` for this machine's own; QWEN35_KERNELS=portable
keeps the AVX512 library out of the model runs, and ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
ATEN_CPU_CAPABILITY=avx2 hold torch's own matrix products and vector ops to AVX2, as on such a laptop. Model rows
are `qwen35 bench` runs in fresh processes: bf16, int4 and int8 on the portable library (its whole-layer decode
steps, kernels/portable_layers.cpp: what such a machine binds), each
prefill either in fp32 (ops/linear.dense_linear: what runs there now) or with torch's bf16 product (before,
QWEN35_BF16_MATMUL=native); and, for scale, int4 on the AVX512 kernels without emulation. Prints tables, then one
JSON line.

    python benchmarks/bench_portable.py [--march x86-64-v3] [--model benchmarks/.cache/replica-0.8b]
    python benchmarks/bench_portable.py --gemv-only --rev HEAD~1   # this tree's GEMVs against another revision's
    python benchmarks/bench_portable.py --llama-cpp                # and llama.cpp built for the same level

`--rev` builds that revision's portable_kernels.cpp (with its headers) beside this tree's, for the same target,
under another op namespace (torch.ops.qwen35_base), and times the two alternating call by call: processes here
drift more than the kernels differ.

`--llama-cpp` then times llama.cpp on the same weights, built for the same instruction set (benchmarks/llamacpp.py
with QWEN35_LLAMACPP_SIMD=avx2 for x86-64-v3: no AVX512 anywhere in it), its Q8_0 and Q4_K_M files beside
qwen35's int8 and int4, round by round (--rounds), each run in its own process, with the cores other processes
used meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

SCHEMES = {"q8_0": 1, "q4_0": 2, "q4_k": 3, "q6_k": 4}
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def build_base(rev: str) -> None:
    """Compile `rev`'s portable kernels as ops qwen35_base::portable_*, with the flags this tree's build uses."""
    import subprocess
    import tempfile

    from torch.utils.cpp_extension import load

    from qwen35.ops.kernels import OPENMP, PORTABLE_HEADERS, PORTABLE_SOURCES, _portable_flags

    out = Path(tempfile.mkdtemp(prefix="qwen35-portable-base-"))
    sources = []
    for name in [p.name for p in PORTABLE_SOURCES + PORTABLE_HEADERS]:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:qwen35/ops/kernels/{name}"],
                               capture_output=True, text=True)
        if shown.returncode and name != "portable_kernels.cpp":  # a file the revision did not have yet
            continue
        shown.check_returncode()
        text = re.sub(r"(TORCH_LIBRARY\w*)\(qwen35,", r"\1(qwen35_base,", shown.stdout)
        (out / name).write_text(text)
        if name.endswith(".cpp"):
            sources.append(str(out / name))
    load(name=f"qwen35_portable_base_{rev.replace('~', '_').replace('^', '_')}",
         sources=sources, extra_cflags=_portable_flags() + OPENMP,
         extra_ldflags=OPENMP, is_python_module=False, build_directory=str(out))


def gemv_table(reps: int, rev: str | None = None, rows_in: int = 1) -> dict:
    import torch

    from qwen35.ops import kernels
    from qwen35.quant import formats

    assert kernels.portable_available(), kernels.portable_reason()
    avx512 = kernels.available()
    if rev:
        build_base(rev)
    g = torch.Generator().manual_seed(0)
    rows = {}
    cols = ["portable"] + ([rev] if rev else []) + (["avx512"] if avx512 else [])
    print(f"GEMV, {rows_in} input row(s), {torch.get_num_threads()} threads: GB/s of weights read (median of {reps})")
    print(f"{'shape':<14}{'scheme':<8}" + "".join(f"{c:>10}" for c in cols))
    for N, K in ((2048, 1024), (7168, 1024), (248320, 1024)):
        w = torch.randn(N, K, generator=g).bfloat16()
        x = torch.randn(rows_in, K, generator=g).bfloat16()
        for s, kind in SCHEMES.items():
            qs, d = formats.quantize_fast(s, w)
            nbytes = qs.numel() * qs.element_size() + d.numel() * d.element_size()
            calls = {"portable": partial(torch.ops.qwen35.portable_gemv, x, qs, d, kind, False)}
            if rev:
                calls[rev] = partial(torch.ops.qwen35_base.portable_gemv, x, qs, d, kind, False)
            if avx512:
                calls["avx512"] = partial(getattr(torch.ops.qwen35, "gemv_" + s), x, qs, d, False)
            times = {k: [] for k in calls}
            n = reps if N < 100_000 else max(5, reps // 10)
            for f in calls.values():
                f()
            for _ in range(n):
                for k, f in calls.items():  # interleaved: both see the same machine
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            gbs = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
            rows[f"{N}x{K}/{s}"] = gbs
            print(f"{f'{N}x{K}':<14}{s:<8}" + "".join(f"{gbs[c]:>10.1f}" for c in cols))
    return rows


def bench(model: str, args: list[str], env: dict, prompt: int, gen: int) -> dict:
    cmd = [sys.executable, "-m", "qwen35", "bench", model, "--prompt-tokens", str(prompt), "--gen-tokens", str(gen),
           "--threads", "2", "--json", *args]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800,
                         check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


AVX2_TORCH = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def llama_cpp_table(args, laptop: dict) -> dict:
    """qwen35 int8 / int4 on the portable kernels and llama.cpp Q8_0 / Q4_K_M, alternating, `args.rounds` rounds."""
    if args.march == "x86-64-v3":
        os.environ["QWEN35_LLAMACPP_SIMD"] = "avx2"  # read when llamacpp is imported: its build folder
    sys.path.insert(0, str(HERE))
    import llamacpp
    from bench_quant import replica_tokenizer

    version = llamacpp.ensure_installed()
    model = Path(args.model)
    files = llamacpp.made_ggufs(model, model.name, ("q8_0", "q4_k_m"), replica_tokenizer())
    runs = {"qwen35 int8": ("int8", None), "qwen35 int4": ("int4", None),
            "llama.cpp Q8_0": (None, "q8_0"), "llama.cpp Q4_K_M": (None, "q4_k_m")}
    rows = {k: [] for k in runs}
    print(f"\nbeside llama.cpp (llama-cpp-python {version}, SIMD {llamacpp.SIMD}, {llamacpp.CMAKE_ARGS}), "
          f"{model.name}, {args.prompt_tokens}-token prompt, {args.gen_tokens} decoded, 2 threads")
    print(f"{'round':<7}{'engine, weights':<20}{'prefill tok/s':>14}{'decode tok/s':>14}{'peak RSS MiB':>14}{'others':>8}")
    for rnd in range(args.rounds):
        for name, (quant, kind) in runs.items():
            mark = llamacpp.load_mark()
            if quant:
                r = bench(args.model, ["--quant", quant], laptop, args.prompt_tokens, args.gen_tokens)
                r = r["rows"][0] if "rows" in r else r
            else:
                r = llamacpp.time_model(files[kind], args.prompt_tokens, args.gen_tokens, 2)
                if "error" in r:
                    raise SystemExit(f"llama.cpp {kind}: {r['error']}")
            row = {k: r.get(k) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb")}
            row["others_cores"] = llamacpp.others_cores(mark)
            rows[name].append(row)
            print(f"{rnd:<7}{name:<20}{row['prefill_tok_s']:>14.1f}{row['decode_tok_s']:>14.2f}"
                  f"{row['peak_rss_mb']:>14.0f}{row['others_cores']:>8.2f}", flush=True)
    for a, b in (("qwen35 int8", "llama.cpp Q8_0"), ("qwen35 int4", "llama.cpp Q4_K_M")):
        ratios = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(rows[a], rows[b])]
        print(f"decode {a} / {b}: " + ", ".join(f"{v:.2f}" for v in ratios))
    return {"llama_cpp_python": version, "simd": llamacpp.SIMD, "cmake_args": llamacpp.CMAKE_ARGS, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--march", default="x86-64-v3", help="portable kernels' target: x86-64-v3 (AVX2), native, ...")
    ap.add_argument("--model", default=str(HERE / ".cache" / "replica-0.8b"))
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--rev", help="also time this git revision's portable GEMVs, alternating with this tree's")
    ap.add_argument("--gemv-rows", type=int, default=1, help="input rows of the GEMV table")
    ap.add_argument("--gemv-only", action="store_true", help="the GEMV table alone, no model runs")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="then llama.cpp built for the same instruction set beside qwen35, on the same weights")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the llama.cpp comparison")
    ap.add_argument("--skip-models", action="store_true", help="no model table (the GEMVs, then --llama-cpp)")
    args = ap.parse_args()
    march = {} if args.march == "native" else {"QWEN35_PORTABLE_MARCH": args.march}
    os.environ.update(march)
    if not Path(args.model).exists():
        from qwen35.commands.replica import build_replica

        build_replica(args.model, "0.8b")
    result = {"bench": "portable", "march": args.march, "rev": args.rev,
              "gemv_gbs": gemv_table(args.reps, args.rev, args.gemv_rows), "decode": {}}
    if args.gemv_only:
        print(json.dumps(result))
        return
    laptop = {"QWEN35_KERNELS": "portable", **march, **(AVX2_TORCH if args.march == "x86-64-v3" else {})}
    before = {**laptop, "QWEN35_BF16_MATMUL": "native"}
    runs = {"bf16 (portable layers)": ([], laptop),
            "bf16, bf16 prefill (before)": ([], before),
            "int4 portable": (["--quant", "int4"], laptop),
            "int4 portable, bf16 prefill (before)": (["--quant", "int4"], before),
            "int8 portable": (["--quant", "int8"], laptop),
            "int4 avx512, no emulation": (["--quant", "int4"], {})}
    if args.skip_models:
        runs = {}
    else:
        print(f"\n{Path(args.model).name}, {args.prompt_tokens}-token prompt, {args.gen_tokens} decoded, 2 threads"
              + (", torch held to AVX2" if args.march == "x86-64-v3" else ""))
        print(f"{'weights / kernels':<40}{'prefill tok/s':>14}{'decode tok/s':>14}{'peak RSS MiB':>14}")
    for name, (extra, env) in runs.items():
        r = bench(args.model, extra, env, args.prompt_tokens, args.gen_tokens)
        row = r["rows"][0] if "rows" in r else r
        result["decode"][name] = {k: row.get(k) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb")}
        print(f"{name:<40}{row.get('prefill_tok_s', 0):>14.1f}{row.get('decode_tok_s', 0):>14.2f}"
              f"{row.get('peak_rss_mb', 0):>14.0f}")
    if args.llama_cpp:
        result["llama_cpp"] = llama_cpp_table(args, laptop)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
