"""The K-quant GEMVs of this tree against those of an earlier revision, in one process, on a quantized model's
matrices in decode order.

Machines here drift by 2x in memory bandwidth from one minute to the next (other tenants), so two processes
cannot compare kernels that differ by 10%. This builds the earlier revision's `quant_k_kernels.cpp` (with its
`quant_common.h`) beside the current kernels under another op namespace (`torch.ops.qwen35_base`), loads the
model once, and times every q4_k / q6_k matrix of a decode step (q8_0 parts run the current kernel in both) with
the two builds alternating round by round. Prints GB/s per round and the median of per-round time ratios for
each input row count, then one JSON line.

    python benchmarks/bench_gemv_ab.py [--rev 2b580c7] [--quant int4] [--rows 1,2,4] [--rounds 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPLICA = HERE / ".cache" / "replica-0.8b"


def build_base(rev: str) -> None:
    """Compile `rev`'s K-quant kernels as ops qwen35_base::gemv_q4_k / gemv_q6_k."""
    from torch.utils.cpp_extension import load

    from qwen35.ops.kernels import FLAGS, OPENMP

    out = Path(tempfile.mkdtemp(prefix="qwen35-base-"))
    for name in ("quant_k_kernels.cpp", "quant_common.h", "quantizers.h", "fp_contract.h"):
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:qwen35/ops/kernels/{name}"],
                               capture_output=True, text=True)
        if shown.returncode and name.endswith(".h"):  # a header the revision did not have yet
            continue
        shown.check_returncode()
        text = shown.stdout
        text = (text.replace("TORCH_LIBRARY_FRAGMENT(qwen35, m)", "TORCH_LIBRARY(qwen35_base, m)")
                .replace("TORCH_LIBRARY_IMPL(qwen35, CPU, m)", "TORCH_LIBRARY_IMPL(qwen35_base, CPU, m)")
                .replace("namespace qwen35_quant ", "namespace qwen35_quant_base "))
        (out / name).write_text(text)
    load(name=f"qwen35_base_{rev}", sources=[str(out / "quant_k_kernels.cpp")], extra_cflags=FLAGS + OPENMP,
         extra_ldflags=OPENMP, is_python_module=False, build_directory=str(out))


def decode_model(path: Path, quant: str, threads: int):
    """The replica at `path` (built if missing) loaded with `quant`, kernels on, and every quantized matrix a
    decode step reads (the MTP head's aside), in decode order. Exits where the kernels cannot run."""
    import qwen35
    from qwen35.ops import kernels
    from qwen35.quant.weight import QuantizedWeight

    if not kernels.available():
        raise SystemExit(f"the kernels are unavailable: {kernels.unavailable_reason()}")
    if not (path / "config.json").is_file():
        from qwen35.commands.replica import build_replica

        build_replica(path, "0.8b")
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    model = qwen35.load_model(path, dtype=torch.bfloat16, quant=quant)
    mats = [w for name, w in model.named_weights() if isinstance(w, QuantizedWeight) and not name.startswith("mtp.")]
    return model, mats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="2b580c7", help="the revision whose kernels are the baseline")
    ap.add_argument("--model", type=Path, default=REPLICA)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--rows", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    model, mats = decode_model(args.model, args.quant, args.threads)
    build_base(args.rev)
    nbytes = sum(w.nbytes for w in mats)
    k_bytes = sum(w.nbytes for w in mats if w.scheme in ("q4_k", "q6_k"))
    builds = {"base": torch.ops.qwen35_base, "this": torch.ops.qwen35}
    print(f"{len(mats)} matrices, {nbytes / 2**20:.0f} MiB ({k_bytes / 2**20:.0f} MiB K-quant), {args.threads} threads, "
          f"baseline {args.rev}")
    result = {"bench": "gemv_ab", "rev": args.rev, "quant": args.quant, "mib": round(nbytes / 2**20), "rows": {}}
    for M in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(M, w.shape[1]).to(torch.bfloat16) for w in mats]

        def step(ops) -> None:
            for w, x in zip(mats, xs):
                op = ops if w.scheme in ("q4_k", "q6_k") else torch.ops.qwen35
                getattr(op, "gemv_" + w.scheme)(x, w.qs, w.d, False)

        for name, ops in builds.items():  # the same results (to the order of fp32 sums), then warm
            step(ops)
        w = next(w for w in mats if w.scheme == "q4_k")
        a, b = (getattr(o, "gemv_q4_k")(xs[0][:, :w.shape[1]], w.qs, w.d, True) for o in builds.values())
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3), "the two builds disagree"
        times: dict[str, list[float]] = {k: [] for k in builds}
        for _ in range(args.rounds):
            for name, ops in builds.items():
                t = time.perf_counter()
                step(ops)
                step(ops)
                times[name].append((time.perf_counter() - t) / 2)
        ratios = sorted(o / n for o, n in zip(times["base"], times["this"]))
        med = statistics.median(ratios)
        for name, ts in times.items():
            print(f"M={M} {name:>4}: " + " ".join(f"{nbytes / t / 1e9:5.1f}" for t in ts) + " GB/s")
        print(f"M={M}: this / base speed, median of rounds {med:.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})")
        result["rows"][M] = {"speedup": round(med, 3), "min": round(ratios[0], 3), "max": round(ratios[-1], 3),
                             "ms_base": round(statistics.median(times["base"]) * 1e3, 2),
                             "ms_this": round(statistics.median(times["this"]) * 1e3, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
