"""Decode and prefill while other programs keep cores busy (issue 18: a laptop is never idle).

For each load (idle, one busy core, two busy cores: `yes > /dev/null` processes started by this script),
runs `qwen35 bench` with the default adaptive threads, pinned to all threads and pinned to one, and, when
llama-cpp-python is installed in the benchmarks' venv (benchmarks/llamacpp.py; `--llamacpp` installs it),
llama.cpp on our own GGUF export of the same weights with two threads and with one. Each run records the
cores' worth of CPU other processes used during it (beyond the busy loops this script started, other work
on a shared machine shows there too).

    python benchmarks/bench_contention.py [--model DIR] [--prompt-tokens 128] [--gen-tokens 64] [--llamacpp]

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llamacpp

REPLICA = HERE / ".cache" / "replica-0.8b"


def qwen35_bench(model: Path, prompt: int, gen: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "qwen35", "bench", str(model), "--prompt-tokens", str(prompt), "--gen-tokens",
           str(gen), "--json"] + ([] if threads is None else ["--threads", str(threads)])
    mark = llamacpp.load_mark()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    others = llamacpp.others_cores(mark)
    if r.returncode != 0:
        return {"error": r.stderr[-500:], "others_cores": others}
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return {"prefill_tok_s": d["prefill_tok_s"], "decode_tok_s": d["decode_tok_s"], "others_cores": others,
            "adaptive": d.get("adaptive_threads")}


def llama_bench(gguf: Path, prompt: int, gen: int, threads: int) -> dict:
    mark = llamacpp.load_mark()
    d = llamacpp.time_model(gguf, prompt, gen, threads=threads)
    others = llamacpp.others_cores(mark)
    if "error" in d:
        return {"error": str(d["error"])[-300:], "others_cores": others}
    return {"prefill_tok_s": round(d.get("prefill_tok_s", float("nan")), 2),
            "decode_tok_s": round(d.get("decode_tok_s", float("nan")), 2), "others_cores": others}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPLICA)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--llamacpp", action="store_true", help="install llama-cpp-python if missing (10-15 min)")
    args = ap.parse_args()
    if args.model == REPLICA and not (REPLICA / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "qwen35", "replica", str(REPLICA), "--shape", "0.8b"], check=True)
    have_llama = llamacpp.venv_python().is_file()
    if args.llamacpp and not have_llama:
        llamacpp.ensure_installed()
        have_llama = True
    gguf = None
    if have_llama:
        gguf = HERE / ".cache" / f"{args.model.name}-qwen35-bf16.gguf"
        if not gguf.is_file():
            r = subprocess.run([sys.executable, "-m", "qwen35", "export", str(args.model), str(gguf), "--type", "bf16"],
                               capture_output=True, text=True, check=False)
            if r.returncode != 0:  # e.g. a replica without a tokenizer: qwen35 rows only, and say why
                print(f"llama.cpp skipped: export failed: {r.stderr.strip().splitlines()[-1]}", flush=True)
                gguf = None
    cores = os.cpu_count() or 2
    rows = []
    for busy in (0, 1, 2):
        hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(busy)]
        try:
            time.sleep(1.0)
            runs = {
                "qwen35 adaptive": qwen35_bench(args.model, args.prompt_tokens, args.gen_tokens, None),
                f"qwen35 --threads {cores}": qwen35_bench(args.model, args.prompt_tokens, args.gen_tokens, cores),
                "qwen35 --threads 1": qwen35_bench(args.model, args.prompt_tokens, args.gen_tokens, 1),
            }
            if gguf is not None:
                runs[f"llama.cpp {cores} threads"] = llama_bench(gguf, args.prompt_tokens, args.gen_tokens, cores)
                runs["llama.cpp 1 thread"] = llama_bench(gguf, args.prompt_tokens, args.gen_tokens, 1)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        for name, r in runs.items():
            rows.append({"busy_cores": busy, "run": name, **r})
    print(f"model {args.model}, {args.prompt_tokens} prompt + {args.gen_tokens} generated tokens, {cores} cores"
          + ("" if gguf else "; llama.cpp not installed (--llamacpp)"))
    print(f"{'busy':>5} {'run':<22}{'prefill tok/s':>15}{'decode tok/s':>14}{'others cores':>14}")
    for r in rows:
        if "error" in r:
            print(f"{r['busy_cores']:>5} {r['run']:<22} error: {r['error'][:60]}")
            continue
        print(f"{r['busy_cores']:>5} {r['run']:<22}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.2f}"
              f"{r['others_cores']:>14.2f}")
    print(json.dumps({"model": str(args.model), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
