"""Train a Qwen3.5-architecture model from scratch (--config) or fine-tune one (--init-from).

Prints `loss=<number>` every --log-every steps, writes checkpoints in the official layout to --out, and
continues exactly where it stopped with --resume.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def setup_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config.json of a new model (any Qwen3.5 shape)")
    src.add_argument("--init-from", help="checkpoint to fine-tune")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)")
    p.add_argument("--data", nargs="+", required=True, help="text files, or JSONL with 'text' or 'messages'")
    p.add_argument("--eval-data", nargs="+", default=None, help="held-out files for an eval loss at the end")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (less memory); default: on for a quantized base, "
                        "off otherwise")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP head's loss (0 = do not train it)")
    p.add_argument("--resume", action="store_true", help="continue from --out's trainer state")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = all weights)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x rank)")
    p.add_argument("--lora-targets", default=",".join(("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv",
                                                       "in_proj_z", "out_proj", "gate_proj", "up_proj", "down_proj")),
                   help="comma-separated projection names that get adapters")
    p.add_argument("--quant", default=None,
                   help="fine-tune on a quantized base (QLoRA): quantize --init-from at load with this policy "
                        "(int4, int8, q8_0, q4_0, q4_k, q6_k); it stays frozen in its packed form and only the "
                        "--lora-rank adapters train. With --bf16 the base computes in bf16. A checkpoint "
                        "written by `qwen35 quantize` is a quantized base without this flag")
    p.add_argument("--merge", default=None,
                   help="quantized base: at the end also write the merged model to --out/merged: bf16 "
                        "(dequantized, plain checkpoint) or a --quant policy (re-quantized); default: the "
                        "adapters alone (lora.safetensors + adapter_config.json)")
    p.add_argument("--export-gguf", type=Path, default=None,
                   help="quantized base: at the end also export the merged model to this .gguf file")
    p.add_argument("--gguf-type", default="bf16", help="type of --export-gguf: bf16, f32, q8_0, q4_0")
    p.set_defaults(train_parser=p)


def main(args: argparse.Namespace) -> int:
    import torch

    from ..chat_template import ChatTemplate
    from ..config import ModelConfig
    from ..errors import Qwen35Error
    from ..runtime import flush_denormals, set_threads, tune_allocator
    from ..tokenizer import Tokenizer
    from ..train.data import pack, read_documents
    from ..train.loop import TrainConfig, init_model, train
    from ..weights import load_model

    check_flags(args)
    set_threads(args.threads)
    tune_allocator(training=True)  # resident memory = live tensors, not heap fragments (runtime.py)
    flush_denormals()  # backward too (runtime.py): the process is ours
    out = Path(args.out)
    tok_dir = Path(args.tokenizer or args.init_from or "")
    if not (tok_dir / "tokenizer.json").is_file():
        raise Qwen35Error(f"no tokenizer.json in {tok_dir}; pass --tokenizer DIR")
    tokenizer = Tokenizer(tok_dir)
    tokenizer.chat_template = ChatTemplate.from_model_dir(tok_dir)
    if args.lora_rank and not args.init_from:
        raise Qwen35Error("--lora-rank fine-tunes an existing model: give --init-from")
    if args.resume and not args.lora_rank:
        model = load_model(out, dtype=torch.float32)
    elif args.init_from:
        # a quantized base computes in bf16 under --bf16 (the packed matrices dequantize straight to bf16
        # through the C++ kernels), in fp32 otherwise; adapters and optimizer state are fp32 either way
        dtype = torch.bfloat16 if args.quant and args.bf16 else torch.float32
        model = load_model(args.init_from, dtype=dtype, quant=args.quant)
    else:
        cfg_path = Path(args.config)
        if not cfg_path.is_file():
            raise Qwen35Error(f"config not found: {cfg_path}")
        model = init_model(ModelConfig.from_hf(json.loads(cfg_path.read_text()), str(cfg_path)), seed=args.seed)
    quantized = model.quant is not None
    if quantized:
        from ..train.qlora import check_trainable

        check_trainable(model, bool(args.lora_rank), args.fsdp)
    elif args.merge or args.export_gguf:
        raise Qwen35Error("--merge and --export-gguf are for a quantized base (--quant); with an unquantized "
                          "base --out already holds the merged checkpoint")
    if args.lora_rank:
        from safetensors.torch import load_file

        from ..train.lora import apply_lora

        apply_lora(model, args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")), seed=args.seed)
        if args.resume and quantized:
            from ..train.qlora import load_adapters

            load_adapters(model, out)
        elif args.resume:
            adapters = load_file(str(out / "lora.safetensors"))
            missing = model.load_state_dict(adapters, strict=False).missing_keys
            if any("lora_" in k for k in missing):
                raise Qwen35Error(f"{out / 'lora.safetensors'} lacks adapters for this --lora-targets/--lora-rank")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise Qwen35Error(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}")
    cfg = TrainConfig(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=args.lr, warmup=args.warmup, seed=args.seed, log_every=args.log_every,
                      save_every=args.save_every, bf16=args.bf16,
                      # a quantized base is there to save memory; unsaved activations would then be the
                      # largest term (GBs at 1024 tokens on a 4B), so it recomputes them unless told not to
                      grad_checkpoint=quantized if args.grad_checkpoint is None else args.grad_checkpoint,
                      mtp_weight=args.mtp_weight, fsdp=args.fsdp)
    rows = pack(read_documents(args.data, tokenizer), args.seq_len, seed=args.seed)
    eval_rows = pack(read_documents(args.eval_data, tokenizer), args.seq_len) if args.eval_data else None
    print(f"{len(rows)} rows of {args.seq_len} tokens; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters", flush=True)
    train(model, rows, cfg, out, tokenizer_dir=tok_dir, resume=args.resume, eval_rows=eval_rows,
          log=lambda s: print(s, flush=True))
    if quantized and (args.merge or args.export_gguf):
        from ..train.qlora import merge_quantized, write_merged

        if args.merge:
            where = write_merged(model, out / "merged", args.merge, tokenizer_dir=tok_dir)
            print(f"wrote the merged model ({args.merge}) to {where}", flush=True)
        else:
            merge_quantized(model)
        if args.export_gguf:
            from ..gguf import export_gguf

            files = export_gguf(model, args.export_gguf, args.gguf_type, tokenizer_from=tok_dir)
            print(f"wrote {', '.join(str(f) for f in files)} ({args.gguf_type})", flush=True)
    return 0


def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work: one line, exit 2, before anything is loaded."""
    from ..gguf import EXPORT_TYPES
    from ..quant.policy import POLICIES
    from ..train.qlora import MERGE_BF16

    def bad(message: str):
        parser = getattr(args, "train_parser", None)
        if parser is None:
            raise SystemExit(f"qwen35 train: error: {message}")
        parser.error(message)

    if args.quant is not None:
        if args.quant not in POLICIES:
            bad(f"--quant {args.quant}: use one of {', '.join(POLICIES)}")
        if not args.init_from:
            bad("--quant quantizes the base you fine-tune: give --init-from")
        if not args.lora_rank:
            bad("--quant keeps the base frozen in its packed form, so only adapters can train: add --lora-rank R "
                "(full fine-tuning needs the unquantized base)")
        if args.fsdp:
            bad("--fsdp shards parameters, and a quantized base's matrices are packed bytes, not parameters: "
                "omit --fsdp with --quant")
    if args.merge is not None and args.merge not in (MERGE_BF16, *POLICIES):
        bad(f"--merge {args.merge}: use bf16 or one of {', '.join(POLICIES)}")
    if args.gguf_type not in EXPORT_TYPES:
        bad(f"--gguf-type {args.gguf_type}: use one of {', '.join(EXPORT_TYPES)}")
    if args.export_gguf is not None and args.export_gguf.suffix != ".gguf":
        bad(f"--export-gguf {args.export_gguf}: the file name must end in .gguf")
