"""Peak memory of 4-bit models against the issue's target, and their decode speed, at 0.8B, 4B and 9B shapes.

Target: peak RSS <= RSS before loading + 1.15 x (quantized weight bytes + KV). Each case runs in a fresh
subprocess (this file with --worker) so its peaks are its own:
- load: `qwen35.load_model(replica, dtype=bfloat16, quant="int4")`, quantizing the bf16 replica tensor by tensor
  as it is read, then a greedy decode (64-token random prompt, 32 tokens, after an 8-token warm-up), timed as
  `qwen35 bench` times it;
- quantize: `qwen35 quantize replica-9b OUT --quant int4`, in a memory cgroup limited to 16 GiB (--limit-gb) where this
  machine lets us make one, the replica's pages dropped from the page cache first (the cgroup is charged for
  the page cache its reads fill and reclaims it under the limit, as a 16 GB machine would); peak RSS from the
  child's rusage;
- load-quantized: `load_model(OUT)` of that output (packed bytes read straight into place), then the decode.
"before" is VmRSS once torch, qwen35 and the C++ kernels are loaded; the peak is VmHWM (reset with clear_refs
after the load, so load and decode peaks are reported apart); quantized bytes are every weight of
`model.named_weights()` (MTP layer and kept bf16/fp32 tensors included); KV is the cache's allocated bytes
(KV capacity plus Gated DeltaNet state). RssFile after the load shows what of the memory-mapped checkpoint is
still counted: the reader releases the pages it copied (MADV_DONTNEED), so it stays near the code's size.

Replicas (random bf16 weights, official layout, 4 GiB shards) are built once into benchmarks/.cache with
checkpoint.write_random_checkpoint (tensor by tensor: a 9B replica, 19 GB on disk, needs ~2 GB of memory).

    python benchmarks/bench_quant_memory.py [--shapes 0.8b,4b,9b] [--no-quantize] [--no-cgroup] [--limit-gb 16]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
TARGET = 1.15
QUANT = "int4"
SIZES_GB = {"0.8b": 1.8, "2b": 4.6, "4b": 9.3, "9b": 19.3}  # bf16 replica on disk, MTP layer included


def status() -> dict[str, float]:
    """Memory fields of /proc/self/status, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) / 1024
    return out


def reset_peak() -> None:
    """VmHWM := VmRSS (qwen35.runtime.reset_peak_rss), and loudly: a peak that was not reset is a wrong number."""
    from qwen35.runtime import reset_peak_rss

    if not reset_peak_rss():
        raise OSError("cannot reset the peak RSS (/proc/self/clear_refs): the peaks would include earlier work")


def worker(path: str, quant: str | None, prompt_tokens: int, gen_tokens: int) -> dict:
    import llamacpp  # beside this file: load_mark / others_cores, how busy the shared cores were
    import torch

    import qwen35
    from qwen35.generation import generate_step
    from qwen35.ops import kernels
    from qwen35.quant.weight import QuantizedWeight
    from qwen35.runtime import set_threads, tune_allocator

    threads = set_threads(None)
    tune_allocator()
    kernels.available()  # build/load the C++ extension now: code, not weights
    before = status()
    t0 = time.perf_counter()
    model = qwen35.load_model(path, dtype=torch.bfloat16, quant=quant)
    load_s = time.perf_counter() - t0
    loaded = status()
    reset_peak()
    weights = sum(w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
                  for _, w in model.named_weights())
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(model.config.vocab_size, 248044), (prompt_tokens,), generator=gen).tolist()
    for _ in generate_step(model, prompt[:8], params=qwen35.SamplingParams(temperature=0, max_tokens=2)):
        pass
    cache = model.make_cache()
    steps = generate_step(model, prompt, cache=cache, params=qwen35.SamplingParams(temperature=0, max_tokens=gen_tokens))
    mark = llamacpp.load_mark()
    t0 = time.perf_counter()
    next(steps)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in steps)
    t2 = time.perf_counter()
    others = llamacpp.others_cores(mark)
    decoded = status()
    kv = cache.allocated_bytes
    peak = max(loaded["VmHWM"], decoded["VmHWM"])
    return {
        "model": path, "quant": model.quant, "threads": threads, "kernels": bool(model.kernels),
        "load_s": round(load_s, 2), "before_mb": round(before["VmRSS"], 1),
        "load_peak_mb": round(loaded["VmHWM"], 1), "decode_peak_mb": round(decoded["VmHWM"], 1),
        "peak_mb": round(peak, 1), "after_load_anon_mb": round(loaded["RssAnon"], 1),
        "after_load_file_mb": round(loaded["RssFile"], 1), "weights_mb": round(weights / 2**20, 1),
        "kv_mb": round(kv / 2**20, 1), "kv_held_mb": round(cache.nbytes / 2**20, 1),
        "ratio": round((peak - before["VmRSS"]) * 2**20 / (weights + kv), 3),
        "prefill_tok_s": round(prompt_tokens / (t1 - t0), 2),
        "decode_tok_s": round((n - 1) / (t2 - t1), 2), "gen_tokens": n, "others_cores": others,
    }


def run_worker(path: Path, quant: str | None, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(path), "--quant", quant or "none",
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def replica(shape: str) -> Path:
    """The bf16 replica of `shape`, built on first use (the index is written last: its presence means done)."""
    path = CACHE / f"replica-{shape}"
    if (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").is_file():
        return path
    free = shutil.disk_usage(CACHE.parent).free / 1e9
    if free < SIZES_GB[shape] + 2:
        raise SystemExit(f"building the {shape} replica needs ~{SIZES_GB[shape]:.0f} GB; {free:.0f} GB free")
    from qwen35.commands.replica import build_replica

    t0 = time.perf_counter()
    build_replica(path, shape, shard_bytes=4 * 2**30)
    print(f"built {path} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return path


def make_cgroup(limit: int) -> Path | None:
    """A memory cgroup (v1) limited to `limit` bytes, nested in this process's own; None where not allowed."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next(line.split(":", 2)[2].strip() for line in f if line.split(":")[1] == "memory")
        cg = Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / f"bench-quant-memory-{os.getpid()}"
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        return cg
    except (OSError, StopIteration, IndexError):
        return None


def quantize(src: Path, out: Path, cgroup: Path | None) -> dict:
    """`qwen35 quantize src out --quant int4` in a child (in `cgroup` when given): peak RSS from its rusage."""
    if out.exists():
        shutil.rmtree(out)

    for f in src.glob("*.safetensors"):  # start cold, so the page cache of the 19 GB read is charged to the cgroup
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    cmd = [sys.executable, "-m", "qwen35", "quantize", str(src), str(out), "--quant", QUANT]
    if cgroup is not None:  # the shell joins the cgroup, then becomes the quantizer
        cmd = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *cmd]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, wstatus, ru = os.wait4(p.pid, 0)
    stdout, stderr = p.stdout.read().decode(), p.stderr.read().decode()
    rc = os.waitstatus_to_exitcode(wstatus)
    res = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1)}
    if cgroup is not None:
        res["cgroup_peak_mb"] = round(int((cgroup / "memory.max_usage_in_bytes").read_text()) / 2**20, 1)
        res["cgroup_limit_hits"] = int((cgroup / "memory.failcnt").read_text())
    if rc != 0:
        res["error"] = (stderr.strip().splitlines() or [f"exit {rc}"])[-1]
    else:
        res["disk_mb"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20, 1)
        res["stdout"] = stdout.strip().splitlines()[-1]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.8b,4b,9b")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--no-quantize", action="store_true", help="skip `qwen35 quantize` of the 9B")
    ap.add_argument("--no-cgroup", action="store_true", help="run the quantize without a memory cgroup")
    ap.add_argument("--limit-gb", type=float, default=16, help="the quantize's cgroup limit, GiB (default 16)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quant", default=QUANT, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        quant = None if args.quant == "none" else args.quant
        print(json.dumps(worker(args.worker, quant, args.prompt_tokens, args.gen_tokens)))
        return

    rows = {}
    shapes = args.shapes.split(",")
    for shape in shapes:
        rows[f"{shape} bf16 -> int4 at load"] = run_worker(replica(shape), QUANT, args)
    quant = None
    if not args.no_quantize and "9b" in shapes:
        out = CACHE / f"replica-9b-{QUANT}"
        cgroup = None if args.no_cgroup else make_cgroup(int(args.limit_gb * 2**30))
        try:
            quant = quantize(replica("9b"), out, cgroup)
            quant["cgroup_limit_mb"] = int(args.limit_gb * 1024) if cgroup is not None else None
        finally:
            if cgroup is not None:
                cgroup.rmdir()
        if quant["rc"] == 0:
            rows[f"9b {QUANT} checkpoint"] = run_worker(out, None, args)

    print(f"peak RSS vs RSS before loading + {TARGET} x (quantized weights + KV); {QUANT}, bf16 kept tensors, "
          f"prompt {args.prompt_tokens}, decode {args.gen_tokens}")
    print(f"{'case':<28}{'load s':>8}{'before':>8}{'weights':>9}{'KV':>6}{'load pk':>9}{'dec pk':>8}{'ratio':>7}"
          f"{'file':>6}{'prefill':>9}{'decode':>8}{'others':>8}")
    for k, v in rows.items():
        if "error" in v:
            print(f"{k:<28}failed: {v['error']}")
            continue
        print(f"{k:<28}{v['load_s']:>8.1f}{v['before_mb']:>8.0f}{v['weights_mb']:>9.0f}{v['kv_mb']:>6.0f}"
              f"{v['load_peak_mb']:>9.0f}{v['decode_peak_mb']:>8.0f}{v['ratio']:>7.3f}{v['after_load_file_mb']:>6.0f}"
              f"{v['prefill_tok_s']:>9.1f}{v['decode_tok_s']:>8.2f}{v['others_cores']:>8.2f}")
    print("MiB throughout; ratio = (peak - before) / (weights + KV), target <= 1.15; file = RssFile after load;\n"
          "prefill and decode in tok/s (2 threads); others: cores' worth of CPU other processes used meanwhile")
    if quant is not None:
        where = (f"in a {quant['cgroup_limit_mb']} MiB memory cgroup (peak charged {quant.get('cgroup_peak_mb')} "
                 f"MiB with page cache, limit hit {quant.get('cgroup_limit_hits')} times)"
                 if quant["cgroup_limit_mb"] else "without a memory limit")
        print(f"\nqwen35 quantize replica-9b --quant {QUANT}: exit {quant['rc']}, {quant['seconds']:.0f}s, peak RSS "
              f"{quant['peak_rss_mb']:.0f} MiB {where}; {quant.get('disk_mb', 0):.0f} MiB of weights written")
    print(json.dumps({"bench": "quant_memory", "target": TARGET, "rows": rows, "quantize_9b": quant}))


if __name__ == "__main__":
    main()
