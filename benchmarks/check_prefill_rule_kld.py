"""What quantizing prefill's inputs costs in quality: the bundled model's next-token distributions over a prompt,
quantized weights prefilled by dequantizing (bf16 weights meet bf16 inputs: what a CPU without an integer GEMM
runs) and by the integer rule (inputs quantized per block of 32: the AVX512 integer GEMM, the portable GEMM and
every decode GEMV), each against the fp32 unquantized model: mean KL divergence and top-1 agreement. Which path
runs is set through quant/weight's machine choice (prefill_gemm_machine), on this machine's kernels. To measure
what an AVX2 laptop runs:

    QWEN35_PORTABLE_MARCH=x86-64-v3 QWEN35_KERNELS=portable ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        ATEN_CPU_CAPABILITY=avx2 python benchmarks/check_prefill_rule_kld.py

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--text", default=str(ROOT / "qwen35" / "generation.py"), help="the prompt's source")
    args = ap.parse_args()

    import qwen35
    from qwen35.commands.common import default_model
    from qwen35.quant import weight as qw

    torch.set_grad_enabled(False)
    ref_model, tok = qwen35.load(default_model(), dtype=torch.float32, kernels=False)
    ids = torch.tensor([tok.encode(Path(args.text).read_text())[: args.tokens]])
    ref = torch.log_softmax(ref_model(ids)[0].float(), -1)
    machine = qw.prefill_gemm_machine()
    rows = []
    print(f"bundled model, {ids.shape[1]} tokens, this machine's integer path: {machine}")
    print(f"{'weights':8} {'prefill':11} {'mean KLD':>10} {'top-1':>8}")
    try:
        for quant in ("int4", "int8"):
            model, _ = qwen35.load(default_model(), dtype=torch.bfloat16, quant=quant)
            for path in ("dequantize", "integer"):
                qw.PREFILL_GEMM = path
                lp = torch.log_softmax(model(ids)[0].float(), -1)
                kld = float((ref.exp() * (ref - lp)).sum(-1).mean())
                top1 = float((lp.argmax(-1) == ref.argmax(-1)).float().mean())
                rows.append({"weights": quant, "prefill": path, "kld": kld, "top1": top1})
                print(f"{quant:8} {path:11} {kld:10.5f} {top1:8.4f}")
    finally:
        qw.PREFILL_GEMM = None
    print(json.dumps({"bench": "prefill_rule_kld", "tokens": ids.shape[1], "machine": machine, "rows": rows}))


if __name__ == "__main__":
    main()
