"""Load time and peak memory for a Qwen3.5-0.8B-shaped checkpoint (random weights, official layout, BF16).

Each loader runs in a fresh subprocess so its peak RSS (VmHWM) is its own; the peak covers the load and
one forward pass, and includes the interpreter and torch (the "base" column). Target: qwen35's peak RSS
<= 1.3x the checkpoint size. qwen35 runs twice: weights in huge pages (default) and in 4 KiB pages. transformers (the reference) is measured beside it when installed.

    python benchmarks/bench_load.py [--shape 0.8b] [--dtype bfloat16] [--skip-transformers]
    python benchmarks/bench_load.py --gguf [--repeats 3]   # safetensors vs GGUF of the same weights

With --gguf the replica is also exported to bf16 and q8_0 GGUF (`qwen35 export`), and loads alternate
safetensors / GGUF `--repeats` times after one warm-up read of every file (so both come from the page cache):
bf16 safetensors vs bf16 GGUF (the same bytes), and quantize-at-load (`quant=q8_0`) vs the q8_0 GGUF (blocks
split straight into place).

Prints a table, then one JSON line.
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
CACHE = HERE / ".cache"

CHILD = r"""
import json, sys, time, torch
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 1024
base = hwm()
t0 = time.perf_counter()
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which.startswith('qwen35'):
    import qwen35
    quant = which.split(':')[1] if ':' in which else None
    t0 = time.perf_counter()
    model = qwen35.load_model(path, dtype=dtype, quant=quant)
    dt = time.perf_counter() - t0
    logits = model(torch.tensor([[1, 2, 3]]))
else:
    import transformers
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    dt = time.perf_counter() - t0
    logits = model(torch.tensor([[1, 2, 3]])).logits
n = sum(p.numel() for p in model.parameters()) if which == 'transformers' else sum(
    w.shape.numel() for _, w in model.named_weights())
print(json.dumps({"load_s": dt, "peak_rss_mb": hwm(), "base_rss_mb": base, "params": n,
                  "finite": bool(torch.isfinite(logits).all())}))
"""


def run_child(which: str, path: Path, dtype: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(path), dtype], capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="0.8b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--gguf", action="store_true", help="compare safetensors with GGUF of the same weights")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from qwen35.commands.replica import build_replica

    path = CACHE / f"replica-{args.shape}"
    if not (path / "config.json").is_file():
        t0 = time.perf_counter()
        build_replica(path, args.shape)
        print(f"built {args.shape} replica in {time.perf_counter() - t0:.1f}s at {path}")
    ckpt_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    if args.gguf:
        return gguf_vs_safetensors(path, args, ckpt_mb)

    # weights in 2 MiB pages (the default: faster decode) and in 4 KiB pages (QWEN35_HUGEPAGES=0: faster
    # first touch on virtual machines whose memory the host backs lazily)
    rows = {"qwen35": run_child("qwen35", path, args.dtype),
            "qwen35_4k": run_child("qwen35", path, args.dtype, {"QWEN35_HUGEPAGES": "0"})}
    if not args.skip_transformers:
        rows["transformers"] = run_child("transformers", path, args.dtype)

    print(f"\ncheckpoint: {args.shape}, {ckpt_mb:.0f} MiB on disk, load dtype {args.dtype}")
    print(f"{'loader':<14}{'params':>12}{'load s':>9}{'base MiB':>10}{'peak RSS MiB':>14}{'RSS / ckpt':>12}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<14}  failed: {r['error']}")
            continue
        print(f"{name:<14}{r['params'] / 1e6:>11.1f}M{r['load_s']:>9.2f}{r['base_rss_mb']:>10.0f}{r['peak_rss_mb']:>14.0f}"
              f"{r['peak_rss_mb'] / ckpt_mb:>12.2f}")
    q = rows["qwen35"]
    result = {"bench": "load", "shape": args.shape, "dtype": args.dtype, "checkpoint_mb": round(ckpt_mb, 1),
              **{f"{k}_{m}": (round(v[m], 3) if isinstance(v.get(m), float) else v.get(m))
                 for k, v in rows.items() for m in ("load_s", "peak_rss_mb", "params")},
              "rss_over_checkpoint": round(q["peak_rss_mb"] / ckpt_mb, 3) if "peak_rss_mb" in q else None}
    print(json.dumps(result))


def gguf_vs_safetensors(path: Path, args, ckpt_mb: float) -> None:
    import statistics

    sys.path.insert(0, str(HERE))
    from llamacpp import load_mark, others_cores

    files = {}
    for kind in ("bf16", "q8_0"):
        files[kind] = CACHE / "gguf-load" / f"{path.name}-{kind}.gguf"
        if not files[kind].is_file():
            files[kind].parent.mkdir(parents=True, exist_ok=True)
            code = ("import sys, torch, qwen35; from qwen35.gguf import export_gguf; "  # no tokenizer: not timed
                    "export_gguf(qwen35.load_model(sys.argv[1], dtype=torch.bfloat16, kernels=False), sys.argv[2], "
                    "sys.argv[3])")
            subprocess.run([sys.executable, "-c", code, str(path), str(files[kind]), kind], check=True)
    for f in [*path.glob("*.safetensors"), *files.values()]:  # warm the page cache: compare reads, not the disk
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    cases = {"safetensors bf16": ("qwen35", path), "GGUF bf16": ("qwen35", files["bf16"]),
             "safetensors quant=q8_0": ("qwen35:q8_0", path), "GGUF q8_0": ("qwen35", files["q8_0"])}
    runs: dict[str, list] = {k: [] for k in cases}
    mark = load_mark()
    for _ in range(args.repeats):
        for name, (which, p) in cases.items():
            runs[name].append(run_child(which, p, args.dtype))
            print(f"{name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    others = others_cores(mark)
    print(f"\n{path.name}: {ckpt_mb:.0f} MiB of safetensors; bf16 GGUF {files['bf16'].stat().st_size / 2**20:.0f} MiB, "
          f"q8_0 GGUF {files['q8_0'].stat().st_size / 2**20:.0f} MiB; {args.repeats} alternating runs, "
          f"other processes used {others} cores on average")
    print(f"{'load':<26}{'min s':>8}{'median s':>10}{'peak RSS MiB':>14}")
    result = {"bench": "load_gguf", "shape": args.shape, "others_cores": others}
    for name, rs in runs.items():
        bad = [r for r in rs if "error" in r]
        if bad:
            print(f"{name:<26}  failed: {bad[0]['error']}")
            continue
        t = [r["load_s"] for r in rs]
        peak = max(r["peak_rss_mb"] for r in rs)
        print(f"{name:<26}{min(t):>8.2f}{statistics.median(t):>10.2f}{peak:>14.0f}")
        result[name.replace(" ", "_").replace("=", "_")] = {"min_s": round(min(t), 3),
                                                             "median_s": round(statistics.median(t), 3),
                                                             "peak_rss_mb": round(peak)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
