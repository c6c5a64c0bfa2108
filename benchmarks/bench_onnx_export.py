"""Memory and time of `qwen35 export-onnx` itself: each export in a process of its own (peak RSS is the
child's ru_maxrss), beside the checkpoint's size, so the table says what a machine needs to export a model.

    python benchmarks/bench_onnx_export.py MODEL [--quant fp32 int8 int4] [--out DIR]

MODEL: a checkpoint directory with a tokenizer.json (e.g. a replica: `qwen35 replica 9b DIR`, then copy a
tokenizer.json into it). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def export_once(model: Path, out: Path, quant: str) -> dict:
    cmd = [sys.executable, "-c", "import resource, sys; from qwen35.cli import main; rc = main(sys.argv[1:]); "
           "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)",
           "export-onnx", str(model), str(out)] + ([] if quant == "fp32" else ["--quant", quant])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"export-onnx {quant} failed:\n{r.stderr[-2000:]}")
    rss = max(int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("maxrss_kb"))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"quant": quant, "seconds": round(wall, 1), "peak_rss_mib": round(rss / 1024), "export_mib": round(size / 2**20)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--quant", nargs="+", default=["int4"], choices=["fp32", "int8", "int4", "q8_0", "q4_0"])
    ap.add_argument("--out", type=Path, default=None, help="where the exports go (default: a temporary folder, "
                    "deleted after each export)")
    args = ap.parse_args()
    ckpt = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    rows = []
    for quant in args.quant:
        out = (args.out or Path(tempfile.mkdtemp(prefix="onnx_export_"))) / quant
        try:
            rows.append(export_once(args.model, out, quant))
        finally:
            if args.out is None:
                shutil.rmtree(out.parent, ignore_errors=True)
    print(f"{args.model} ({ckpt / 2**30:.2f} GiB of safetensors), {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB of memory")
    print(f"{'quant':>6} {'seconds':>8} {'peak RSS MiB':>13} {'export MiB':>11}")
    for r in rows:
        print(f"{r['quant']:>6} {r['seconds']:>8} {r['peak_rss_mib']:>13} {r['export_mib']:>11}")
    print(json.dumps({"model": str(args.model), "checkpoint_mib": round(ckpt / 2**20), "runs": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
