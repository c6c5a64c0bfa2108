"""Export a model as ONNX graphs for onnxruntime: `qwen35 export-onnx MODEL OUT_DIR [--quant int8|int4|q8_0|q4_0]`.

Writes prefill.onnx (a chunk of tokens) and decode.onnx (one token), the cache as explicit inputs and outputs,
the weights once in model.onnx.data, the tokenizer and chat template, and manifest.json (names and shapes for
any runtime). See qwen35/export/onnx.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def setup_parser(p: argparse.ArgumentParser) -> None:
    from ..export.onnx import OPSETS, POLICIES
    from .common import integer

    p.add_argument("model", help="checkpoint directory or Hugging Face repo id")
    p.add_argument("out_dir", type=Path, help="output directory")
    p.add_argument("--quant", choices=tuple(POLICIES), default=None,
                   help="matrices as onnxruntime MatMulNBits holding qwen35's q8_0 / q4_0 blocks: q8_0 (or int8) "
                   "everywhere, q4_0 everywhere, or int4: qwen35's int4 mix in those two; default fp32")
    p.add_argument("--opset", type=integer(OPSETS.start, OPSETS.stop - 1), default=21,
                   help=f"ONNX opset ({OPSETS.start}..{OPSETS.stop - 1}, default 21)")


def main(args: argparse.Namespace) -> int:
    from ..export.onnx import export_onnx
    from .common import check_output_dir

    # into the source itself, the tokenizer would be copied onto itself after minutes of export (a quantized
    # checkpoint asked for other blocks, or a tokenizer past the vocabulary, export_onnx refuses itself)
    check_output_dir(args.out_dir, Path(args.model).expanduser())
    manifest = export_onnx(args.model, args.out_dir, quant=args.quant, opset=args.opset, progress=True)
    files = ["manifest.json", manifest["external_data"], *(g["file"] for g in manifest["graphs"].values())]
    size = sum((args.out_dir / f).stat().st_size for f in files)
    print(f"wrote {args.out_dir}: {', '.join(files)} ({manifest['quant'] or 'fp32'}, {size / 2**20:.1f} MiB)")
    return 0

