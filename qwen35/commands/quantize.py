"""Write a quantized checkpoint: `qwen35 quantize MODEL OUT --quant int4|int8|q8_0|q4_0|q4_k|q6_k`.

The model is quantized tensor by tensor as it is read (peak memory ~ the quantized model + one tensor), then
written with a `quantization_config` in config.json; `load_model` reads it back without requantizing.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def setup_parser(p: argparse.ArgumentParser) -> None:
    from ..quant.policy import POLICIES
    from .common import positive_number

    p.add_argument("model", help="checkpoint directory or Hugging Face repo id")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--quant", choices=POLICIES, required=True,
                   help="int8 / int4 (the recommended 8- and 4-bit policies) or a layout for every matrix")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "bf16", "float32", "fp32"),
                   help="precision of the tensors kept unquantized")
    p.add_argument("--max-shard-gb", type=positive_number, default=2.0, help="max shard size in GiB (default 2)")


def main(args: argparse.Namespace) -> int:
    import torch

    from ..api import resolve
    from ..gguf.reader import is_gguf_path
    from ..quant.checkpoint import save_quantized
    from ..weights import load_model
    from .common import check_no_checkpoint, check_output_dir

    src = resolve(args.model)
    check_output_dir(args.out, src)  # before minutes of quantizing
    check_no_checkpoint(args.out)
    if is_gguf_path(src):
        from ..errors import Qwen35Error

        raise Qwen35Error(f"{src}: a GGUF is requantized with `qwen35 export {src} OUT.gguf --type q8_0|q4_0`, "
                          f"or loaded as it is with --quant")
    dtype = torch.float32 if args.dtype in ("float32", "fp32") else torch.bfloat16
    model = load_model(src, dtype=dtype, quant=args.quant, kernels=False, progress=True)
    save_quantized(model, src, args.out, int(args.max_shard_gb * 2**30))
    size = sum(f.stat().st_size for f in written_shards(args.out))
    print(f"wrote {args.out} ({args.quant}, {size / 2**20:.1f} MiB of weights)")
    return 0


def written_shards(out: Path) -> list[Path]:
    """The shards the written index names (not whatever else *.safetensors the folder holds)."""
    import json

    from ..checkpoint_index import INDEX_FILE

    index = out / INDEX_FILE
    if not index.is_file():
        return sorted(out.glob("*.safetensors"))
    return [out / n for n in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))]
