"""How close the exported ONNX graphs are to the unquantized model: mean KL of next-token distributions against
qwen35's fp32 logits, and greedy agreement, over held-out text (the rows `bench_quant.py` uses), on the bundled
model (trained, so its distributions mean something). Every position is a step of the graph in onnxruntime
(CPU), 8 rows at a time; all variants come from one export.

    python benchmarks/bench_onnx_quality.py [--rows 16] [--quant fp32 int8 int4 q4_0]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_quant import heldout_rows  # noqa: E402


def graph_logp(om, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """log-softmax of the graph's next-token logits at every position of ids [R, T], one step per token."""
    out = []
    for i in range(0, ids.shape[0], batch):
        rows = ids[i : i + batch].numpy()
        cache, steps = om.empty_cache(rows.shape[0]), []
        for t in range(rows.shape[1]):
            logits, cache = om.step("prefill", rows[:, t : t + 1], cache)
            steps.append(torch.from_numpy(logits))
        out.append(torch.stack(steps, 1).log_softmax(-1))
    return torch.cat(out)


def main() -> int:
    import qwen35
    from qwen35.commands.common import default_model
    from qwen35.export.onnx import export_model
    from qwen35.export.onnx_runtime import OnnxModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16, help="held-out rows of 256 tokens")
    ap.add_argument("--quant", nargs="+", default=["fp32", "int8", "int4", "q4_0"])
    args = ap.parse_args()
    path = default_model()
    ref, tok = qwen35.load(path, dtype=torch.float32, kernels=False)
    ids = heldout_rows(tok, args.rows)
    with torch.no_grad():
        ref_logp = torch.cat([ref(ids[i : i + 8]).log_softmax(-1) for i in range(0, ids.shape[0], 8)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {q: Path(tmp) / q for q in args.quant}
        export_model(ref, [(d, None if q == "fp32" else q, None) for q, d in dirs.items()], path)
        for q, d in dirs.items():
            lq = graph_logp(OnnxModel(d, threads=2), ids)
            kl = (ref_logp.exp() * (ref_logp - lq)).sum(-1).mean().item()
            agree = (ref_logp.argmax(-1) == lq.argmax(-1)).float().mean().item()
            mib = (d / "model.onnx.data").stat().st_size / 2**20
            rows.append({"quant": q, "kl": kl, "greedy_agreement": agree, "weights_mib": round(mib, 2)})
    print(f"bundled model, {ids.numel()} held-out tokens, onnxruntime CPU against qwen35 fp32")
    print(f"{'quant':>6} {'mean KL':>9} {'greedy agreement':>17} {'weights MiB':>12}")
    for r in rows:
        print(f"{r['quant']:>6} {r['kl']:>9.5f} {r['greedy_agreement']:>17.3f} {r['weights_mib']:>12.2f}")
    print(json.dumps({"tokens": ids.numel(), "runs": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
