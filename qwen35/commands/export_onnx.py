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

    # into the source itself, the tokenizer would be copied onto itself after minutes of export
    check_output_dir(args.out_dir, Path(args.model).expanduser())
    check_not_requantized(args.model, args.quant)
    if Path(args.model).is_dir():  # (a hub id is resolved by export_onnx; a GGUF is refused there)
        from ..config import ModelConfig
        from ..export.onnx import check_tokenizer

        model = Path(args.model).expanduser()
        check_tokenizer(model, ModelConfig.from_file(model / "config.json"))
    manifest = export_onnx(args.model, args.out_dir, quant=args.quant, opset=args.opset, progress=True)
    files = ["manifest.json", manifest["external_data"], *(g["file"] for g in manifest["graphs"].values())]
    size = sum((args.out_dir / f).stat().st_size for f in files)
    print(f"wrote {args.out_dir}: {', '.join(files)} ({manifest['quant'] or 'fp32'}, {size / 2**20:.1f} MiB)")
    return 0


def check_not_requantized(model: str, quant: str | None) -> None:
    """Another --quant than the stored policy would dequantize the matrices and quantize them again in other
    blocks (int4's q4_k -> fp32 -> q8_0), losing accuracy twice: refused as load_model refuses it."""
    from ..api import resolve
    from ..errors import CheckpointError
    from ..quant.checkpoint import read_quant_config

    src = resolve(model)
    stored = read_quant_config(src) if src.is_dir() else None
    if stored and quant not in (None, stored.get("policy")):
        raise CheckpointError(f"{src} is already quantized ({stored.get('policy')}); export it without --quant, "
                              f"or export the original checkpoint with --quant {quant}")
