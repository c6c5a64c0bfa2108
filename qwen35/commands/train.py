"""Train a Qwen3.5-architecture model from scratch (--config) or fine-tune one (--init-from).

Prints `loss=<number>` every --log-every steps, writes checkpoints in the official layout to --out, and
continues exactly where it stopped with --resume.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def setup_parser(p: argparse.ArgumentParser) -> None:
    from ..train.lora import DEFAULT_TARGETS, KNOWN_TARGETS
    from .common import POSITIVE, integer, number, positive_number

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config.json of a new model (any Qwen3.5 shape)")
    src.add_argument("--init-from", help="checkpoint to fine-tune")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)")
    p.add_argument("--data", nargs="+", required=True, help="text files, or JSONL with 'text' or 'messages'")
    p.add_argument("--eval-data", nargs="+", default=None, help="held-out files for an eval loss at the end")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=POSITIVE, default=100)
    p.add_argument("--seq-len", type=integer(2), default=512, help="tokens per row (a target needs two)")
    p.add_argument("--batch-size", type=POSITIVE, default=4)
    p.add_argument("--grad-accum", type=POSITIVE, default=1)
    p.add_argument("--lr", type=positive_number, default=1e-3)
    p.add_argument("--warmup", type=integer(0), default=10)
    p.add_argument("--log-every", type=POSITIVE, default=1)
    p.add_argument("--save-every", type=integer(0), default=0, help="0: only at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (less memory); default: on for a quantized base, "
                        "off otherwise")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    p.add_argument("--mtp-weight", type=number(0), default=0.3,
                   help="weight of the MTP head's loss (0 = do not train it)")
    p.add_argument("--resume", action="store_true", help="continue from --out's trainer state")
    p.add_argument("--threads", type=POSITIVE, default=None)
    p.add_argument("--lora-rank", type=integer(0), default=0, help="train LoRA adapters of this rank (0 = all weights)")
    p.add_argument("--lora-alpha", type=positive_number, default=None,
                   help="LoRA scale numerator (default 2 x rank)")
    p.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated projection names that get adapters (of {', '.join(KNOWN_TARGETS)})")
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
    p.add_argument("--gguf-type", default="bf16", help="type of --export-gguf: bf16, f32, q8_0, q4_0, q4_k_m, or int8 / int4 (= q8_0 / q4_k_m)")
    p.set_defaults(train_parser=p)


def main(args: argparse.Namespace) -> int:
    import torch

    from ..chat_template import ChatTemplate
    from ..errors import Qwen35Error
    from ..runtime import flush_denormals, set_threads, tune_allocator
    from ..tokenizer import Tokenizer
    from ..train.data import check_targets, check_vocab, data_fingerprint, pack, read_documents
    from ..train.loop import TrainConfig, init_model, train
    from ..train.run_state import check_processes
    from ..weights import load_model

    check_flags(args)
    out = Path(args.out)
    # paths, the saved state, the config and the data before minutes of loading (and before the process's
    # threads and allocator are set: a refused run leaves its caller as it was)
    check_paths(args, out)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))  # set by torchrun
    check_processes(args.batch_size, world)
    fingerprint = data_fingerprint(args.data)
    state = check_resume(args, out, fingerprint) if args.resume else None
    if state is not None and state["step"] >= args.steps and not (args.merge or args.export_gguf):
        if rank == 0:
            print(f"run already complete: step {state['step']} of {args.steps} in {out} (nothing to train; a "
                  "higher --steps continues it)", flush=True)
        return 0
    config = read_config(Path(args.config)) if args.config else None
    if config is not None:
        check_seq_len(args, config)
    base = base_config(args.init_from) if args.init_from and not (args.resume and not args.lora_rank) else None
    if base is not None:  # the checkpoint's own config.json / GGUF metadata: its context now, not after the load
        check_seq_len(args, base)
    tok_dir = Path(args.tokenizer or args.init_from or "")
    if not (tok_dir / "tokenizer.json").is_file():
        raise Qwen35Error(f"no tokenizer.json in {tok_dir}; pass --tokenizer DIR")
    tokenizer = Tokenizer(tok_dir)
    tokenizer.chat_template = ChatTemplate.from_model_dir(tok_dir)
    if base is not None:
        check_vocab(tokenizer.vocab_size, base.vocab_size)
    rows = pack(read_documents(args.data, tokenizer), args.seq_len, seed=args.seed)
    check_targets(rows, "--data", args.seq_len)
    eval_rows = pack(read_documents(args.eval_data, tokenizer), args.seq_len) if args.eval_data else None
    if eval_rows is not None:
        check_targets(eval_rows, "--eval-data", args.seq_len)
    set_threads(args.threads)
    tune_allocator(training=True)  # resident memory = live tensors, not heap fragments (runtime.py)
    flush_denormals()  # backward too (runtime.py): the process is ours
    if args.resume and not args.lora_rank:
        model = load_model(out, dtype=torch.float32)
    elif args.init_from:
        # a quantized base computes in bf16 under --bf16 (the packed matrices dequantize straight to bf16
        # through the C++ kernels), in fp32 otherwise; adapters and optimizer state are fp32 either way
        dtype = torch.bfloat16 if args.quant and args.bf16 else torch.float32
        model = load_model(args.init_from, dtype=dtype, quant=args.quant)
    else:
        model = init_model(config, seed=args.seed)
    check_seq_len(args, model.config)
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

        apply_lora(model, args.lora_rank, args.lora_alpha, lora_targets(args), seed=args.seed)
        if args.resume and quantized:
            from ..train.qlora import load_adapters

            load_adapters(model, out)
        elif args.resume:
            adapters = load_file(str(out / "lora.safetensors"))
            missing = model.load_state_dict(adapters, strict=False).missing_keys
            if any("lora_" in k for k in missing):
                raise Qwen35Error(f"{out / 'lora.safetensors'} lacks adapters for this --lora-targets/--lora-rank")
    check_vocab(tokenizer.vocab_size, model.config.vocab_size)
    cfg = TrainConfig(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=args.lr, warmup=args.warmup, seed=args.seed, log_every=args.log_every,
                      save_every=args.save_every, bf16=args.bf16,
                      # a quantized base is there to save memory; unsaved activations would then be the
                      # largest term (GBs at 1024 tokens on a 4B), so it recomputes them unless told not to
                      grad_checkpoint=quantized if args.grad_checkpoint is None else args.grad_checkpoint,
                      mtp_weight=args.mtp_weight, fsdp=args.fsdp, data=fingerprint)
    if rank == 0:
        print(f"{len(rows)} rows of {args.seq_len} tokens; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters", flush=True)
    args.training = True  # past the checks every process makes alike (python -m qwen35.train reads this)
    train(model, rows, cfg, out, tokenizer_dir=tok_dir, resume=state or False, eval_rows=eval_rows,
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


# what a run writes beside its checkpoint: another run writing there would append to or sit beside them
RUN_FILES = ("metrics.jsonl", "trainer_state.pt", "lora.safetensors", "adapter_config.json")


def check_paths(args: argparse.Namespace, out: Path) -> None:
    """Where the run writes: --out a directory that is not the model being fine-tuned (writing there replaces
    the weights being read), holding no earlier run unless --resume continues it; --export-gguf a file that is
    not the GGUF being fine-tuned (it is memory-mapped while the export writes)."""
    from ..errors import Qwen35Error
    from ..train.run_state import SAVED
    from .common import check_no_checkpoint, check_output_dir, check_output_file

    check_output_dir(out, Path(args.init_from) if args.init_from else None)
    if not args.resume:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found == ["metrics.jsonl"] and not (out / SAVED).exists():
            found = []  # a run stopped before its first save: nothing of it to resume, so a new one starts
        if found:
            raise Qwen35Error(f"{out} already holds a training run ({', '.join(found)}): continue it with "
                              "--resume, or write to a new or empty directory")
        check_no_checkpoint(out)
    if args.export_gguf is not None:
        check_output_file(args.export_gguf)
        if args.init_from and args.export_gguf.resolve() == Path(args.init_from).resolve():
            raise Qwen35Error(f"--export-gguf {args.export_gguf} is the model being fine-tuned (--init-from): "
                              "write to another file")


def check_resume(args: argparse.Namespace, out: Path, data: list | None = None) -> dict:
    """The state --resume continues, read and checked against the flags (and `data`, the --data files'
    data_fingerprint) before the model loads."""
    from ..train.lora import lora_scale
    from ..train.qlora import ADAPTER_CONFIG
    from ..train.run_state import check_same_lora, check_same_run, check_steps, load_state

    state = load_state(out)
    check_same_run(state, {"lr": args.lr, "seq_len": args.seq_len, "batch_size": args.batch_size,
                           "grad_accum": args.grad_accum, "warmup": args.warmup, "seed": args.seed,
                           "mtp_weight": args.mtp_weight, "bf16": args.bf16, "data": data}, out)
    check_steps(state, args.steps, out)
    check_resume_rank(args, out)
    if args.lora_rank:
        saved = state.get("lora")
        if saved is None and (out / ADAPTER_CONFIG).is_file():  # a quantized base's run: its adapters' own
            saved = json.loads((out / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        check_same_lora(saved, {"rank": args.lora_rank, "scale": lora_scale(args.lora_rank, args.lora_alpha),
                                "base": args.init_from}, out)
    return state


def check_resume_rank(args: argparse.Namespace, out: Path) -> None:
    """A LoRA run resumes with its adapters' rank; a full fine-tune without adapters, and the reverse."""
    from ..errors import Qwen35Error

    adapters = out / "lora.safetensors"
    if not adapters.is_file():
        if args.lora_rank:
            raise Qwen35Error(f"--resume --lora-rank {args.lora_rank}: {out} holds no {adapters.name} (it trained "
                              "all weights): omit --lora-rank")
        return
    from safetensors import safe_open

    try:
        with safe_open(str(adapters), "pt") as f:
            ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_A")}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails with any exception
        raise Qwen35Error(f"{adapters}: not readable adapters ({(str(e).splitlines() or [''])[0]})") from None
    if not args.lora_rank:
        raise Qwen35Error(f"--resume: {out} is a LoRA run (rank {', '.join(map(str, sorted(ranks)))}): give its "
                          "--lora-rank")
    if ranks != {args.lora_rank}:
        raise Qwen35Error(f"--lora-rank {args.lora_rank} differs from the adapters in {adapters} (rank "
                          f"{', '.join(map(str, sorted(ranks)))}): resume with the run's own --lora-rank")


def read_config(path: Path):
    """The --config of a new model, or a one-line error saying what is wrong with the file."""
    from ..config import ModelConfig
    from ..errors import Qwen35Error

    if not path.is_file():
        raise Qwen35Error(f"config not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise Qwen35Error(f"--config {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise Qwen35Error(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise Qwen35Error(f"--config {path}: expected a JSON object (a config.json), got {type(raw).__name__}")
    return ModelConfig.from_hf(raw, str(path))


def base_config(init_from: str):
    """The config of --init-from read without its weights (a checkpoint directory's config.json, a GGUF's
    metadata); None where it is neither (load_model then names what is wrong with the path)."""
    from ..config import ModelConfig
    from ..gguf.reader import is_gguf_path

    p = Path(init_from)
    if is_gguf_path(p) and p.is_file():
        from ..gguf import read_config as read_gguf_config

        return read_gguf_config(p)
    return ModelConfig.from_file(p) if (p / "config.json").is_file() else None


def check_seq_len(args: argparse.Namespace, config) -> None:
    """Rows longer than the model's context train positions it was never meant to see (and RoPE past them)."""
    from ..errors import Qwen35Error

    limit = getattr(config, "max_position_embeddings", None)
    if limit and args.seq_len > limit:
        raise Qwen35Error(f"--seq-len {args.seq_len} exceeds the model's context (max_position_embeddings "
                          f"{limit})")


def lora_targets(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())


def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work: one line, exit 2, before anything is loaded."""
    from ..gguf import EXPORT_TYPES
    from ..gguf.writer import TYPE_ALIASES
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
    # the policy names (int8, int4) name their GGUF types here too, as in `qwen35 export --type`
    args.gguf_type = TYPE_ALIASES.get(args.gguf_type, args.gguf_type)
    if args.gguf_type not in EXPORT_TYPES:
        bad(f"--gguf-type {args.gguf_type}: use one of {', '.join([*EXPORT_TYPES, *TYPE_ALIASES])}")
    if args.export_gguf is not None and args.export_gguf.suffix != ".gguf":
        bad(f"--export-gguf {args.export_gguf}: the file name must end in .gguf")
    from ..train.lora import KNOWN_TARGETS

    unknown = [t for t in lora_targets(args) if t not in KNOWN_TARGETS]
    if unknown or not lora_targets(args):
        bad(f"--lora-targets: unknown projection {', '.join(unknown) or '(none given)'}: use names from "
            f"{', '.join(KNOWN_TARGETS)}")
    if args.lora_rank and not args.init_from:
        bad("--lora-rank fine-tunes an existing model: give --init-from")
    if args.lora_alpha is not None and not args.lora_rank:
        bad("--lora-alpha scales adapters: add --lora-rank R")
