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
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP head's loss (0 = do not train it)")
    p.add_argument("--resume", action="store_true", help="continue from --out's trainer state")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = all weights)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x rank)")
    p.add_argument("--lora-targets", default=",".join(("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv",
                                                       "in_proj_z", "out_proj", "gate_proj", "up_proj", "down_proj")),
                   help="comma-separated projection names that get adapters")


def main(args: argparse.Namespace) -> int:
    import torch

    from ..chat_template import ChatTemplate
    from ..config import ModelConfig
    from ..errors import Qwen35Error
    from ..runtime import set_threads
    from ..tokenizer import Tokenizer
    from ..train.data import pack, read_documents
    from ..train.loop import TrainConfig, init_model, train
    from ..weights import load_model

    set_threads(args.threads)
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
        model = load_model(args.init_from, dtype=torch.float32)
    else:
        cfg_path = Path(args.config)
        if not cfg_path.is_file():
            raise Qwen35Error(f"config not found: {cfg_path}")
        model = init_model(ModelConfig.from_hf(json.loads(cfg_path.read_text()), str(cfg_path)), seed=args.seed)
    if args.lora_rank:
        from safetensors.torch import load_file

        from ..train.lora import apply_lora

        apply_lora(model, args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")), seed=args.seed)
        if args.resume:
            adapters = load_file(str(out / "lora.safetensors"))
            missing = model.load_state_dict(adapters, strict=False).missing_keys
            if any("lora_" in k for k in missing):
                raise Qwen35Error(f"{out / 'lora.safetensors'} lacks adapters for this --lora-targets/--lora-rank")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise Qwen35Error(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}")
    cfg = TrainConfig(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=args.lr, warmup=args.warmup, seed=args.seed, log_every=args.log_every,
                      save_every=args.save_every, bf16=args.bf16, grad_checkpoint=args.grad_checkpoint,
                      mtp_weight=args.mtp_weight, fsdp=args.fsdp)
    rows = pack(read_documents(args.data, tokenizer), args.seq_len, seed=args.seed)
    eval_rows = pack(read_documents(args.eval_data, tokenizer), args.seq_len) if args.eval_data else None
    print(f"{len(rows)} rows of {args.seq_len} tokens; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters", flush=True)
    train(model, rows, cfg, out, tokenizer_dir=tok_dir, resume=args.resume, eval_rows=eval_rows,
          log=lambda s: print(s, flush=True))
    return 0
