"""Write a model as a GGUF file llama.cpp loads: `qwen35 export MODEL OUT.gguf --type bf16|f32|q8_0|q4_0|q4_k_m`
(or int8 / int4, the policy names for q8_0 / q4_k_m).

MODEL is a checkpoint directory (its tokenizer and chat template go in too), a hub repo id, or a GGUF file
(re-export, e.g. to another type; its tokenizer metadata is copied). q8_0 / q4_0 / q4_k_m are quantized with
our quantizer (the bytes llama.cpp's would write; q4_k_m is our `int4` policy), tensor by tensor as the
model is read. A quantized MODEL (a quantized GGUF, a `qwen35 quantize` checkpoint) keeps the matrices already
in the type's layout; the others are requantized from their dequantized values (a warning counts them).

A vision checkpoint's tower goes to a second file, as llama.cpp keeps it: the mmproj GGUF its mtmd library
(and LM Studio) loads beside the text model, `mmproj-<OUT stem>.gguf` next to OUT unless --mmproj names
another path or --no-mmproj skips it (gguf/mmproj.py). A GGUF MODEL's tower is the mmproj file beside it,
which loading finds (mmproj-<stem>.gguf), re-exported to the new type.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def setup_parser(p: argparse.ArgumentParser) -> None:
    from ..gguf import EXPORT_TYPES
    from ..gguf.writer import TYPE_ALIASES
    from .common import positive_number

    p.add_argument("model", help="checkpoint directory, Hugging Face repo id or GGUF file")
    p.add_argument("out", type=Path, help="output .gguf file")
    p.add_argument("--type", dest="file_type", choices=(*EXPORT_TYPES, *TYPE_ALIASES), default="bf16",
                   help="bf16 (default), f32, or q8_0 / q4_0 / q4_k_m (every matrix the quantization policy of "
                        "that name, int4 for q4_k_m, quantizes; norms, conv1d, ssm_a, dt bias stay F32); "
                        "int8 / int4 are the same as q8_0 / q4_k_m, as --quant names those policies. A vision "
                        "tower's mmproj takes the type's F32 / BF16 / Q8_0 matrices as llama.cpp's converter "
                        "writes them, and stays BF16 for q4_0 / q4_k_m (the converter writes no 4-bit towers)")
    p.add_argument("--no-mtp", dest="mtp", action="store_false", help="drop the MTP (multi-token prediction) head")
    p.add_argument("--name", default=None, help="general.name (default: the output file's stem)")
    p.add_argument("--split-max-gb", type=positive_number, default=0.0,
                   help="split into -0000K-of-0000N.gguf parts of at most this size (default: one file)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mmproj", type=Path, default=None, metavar="PATH",
                   help="where a vision checkpoint's tower goes (llama.cpp's mmproj GGUF; default: "
                        "mmproj-<OUT stem>.gguf beside OUT)")
    g.add_argument("--no-mmproj", action="store_true", help="write the text model only, not the vision tower")


def main(args: argparse.Namespace) -> int:
    import torch

    from ..api import resolve
    from ..config import ModelConfig
    from ..errors import Qwen35Error
    from ..gguf import export_gguf, export_mmproj, mmproj_path, open_gguf
    from ..gguf.metadata import check_exportable, config_dict
    from ..gguf.mmproj import FILE_TYPES, find_mmproj
    from ..gguf.reader import is_gguf_path
    from ..gguf.writer import POLICY, TYPE_ALIASES
    from ..quant.checkpoint import read_quant_config
    from ..weights import load_model

    for out, flag in ((args.out, "the output"), (args.mmproj, "the --mmproj")):
        if out is not None and out.suffix != ".gguf":
            raise Qwen35Error(f"{out}: {flag} file name must end in .gguf")
    mmproj = None if args.no_mmproj else (args.mmproj or mmproj_path(args.out))
    if mmproj is not None and mmproj.resolve() == args.out.resolve():
        raise Qwen35Error(f"{mmproj}: --mmproj names the output file itself; give the tower a file of its own")
    from .common import check_output_file

    # a GGUF re-exported onto itself is fine: the writer writes a temporary file and renames it over OUT
    check_output_file(args.out)
    if mmproj is not None:
        check_output_file(mmproj)
    src = resolve(args.model)
    args.file_type = TYPE_ALIASES.get(args.file_type, args.file_type)
    quant = POLICY.get(args.file_type)
    dtype = torch.float32 if args.file_type == "f32" else torch.bfloat16
    source_gguf = open_gguf(src) if is_gguf_path(src) else None
    config = (ModelConfig.from_hf(config_dict(source_gguf), source=str(source_gguf.path))
              if source_gguf is not None else ModelConfig.from_file(src))
    check_exportable(config)  # before the weights load: a yarn setting GGUF cannot hold is said now
    # a GGUF's tower is the mmproj beside it, which loading attaches (gguf/mmproj.find_mmproj)
    found = find_mmproj(src) if source_gguf is not None and not args.no_mmproj else None
    if args.mmproj is not None and found is None and (source_gguf is not None or config.vision_config is None):
        what = ("a GGUF with no mmproj file beside it" if source_gguf is not None else "a text-only checkpoint")
        raise Qwen35Error(f"{args.model} is {what}: there is no vision tower to write to --mmproj {args.mmproj}")
    if quant is not None and (source_gguf is not None or read_quant_config(src) is not None):
        # a GGUF or a `qwen35 quantize` checkpoint is loaded as it is (quant= would refuse another policy);
        # the writer keeps the matrices already in the layout and requantizes the others, with a warning
        quant = None
    model = load_model(src, dtype=dtype, quant=quant, kernels=False, progress=True,
                       mmproj=False if args.no_mmproj else None)
    files = export_gguf(model, args.out, args.file_type, mtp=args.mtp,
                        tokenizer_from=None if source_gguf is not None else src, gguf_source=source_gguf,
                        name=args.name, split_max_bytes=int(args.split_max_gb * 2**30), progress=True)
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {', '.join(str(f) for f in files)} ({args.file_type}, {size / 2**20:.1f} MiB)")
    if getattr(model, "visual", None) is not None and mmproj is not None:
        f = export_mmproj(model, mmproj, args.file_type, name=args.name or args.out.stem)
        print(f"wrote {f} (the vision tower: llama.cpp's mmproj, {FILE_TYPES[args.file_type][1]} matrices, "
              f"{f.stat().st_size / 2**20:.1f} MiB)")
    elif args.mmproj is not None:  # a composite config whose checkpoint holds no tower tensors
        raise Qwen35Error(f"{args.model} has no vision tower weights: nothing was written to --mmproj {args.mmproj}")
    elif source_gguf is not None and not args.no_mmproj:
        print(f"note: {args.model} is a GGUF with no mmproj-*.gguf beside it: no vision tower written")
    return 0
