"""Flags shared by the commands that generate: model, dtype, threads and sampling; and the argparse types
that refuse a bad value at start with one line (`--threads 0`, `--temperature inf`, `--port 99999`)."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace

import torch

from ..errors import Qwen35Error
from ..sampling import SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def integer(lo: int | None = None, hi: int | None = None):
    """An argparse type: an integer within [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            span = f"between {lo} and {hi}" if lo is not None and hi is not None else f"at least {lo}" \
                if lo is not None else f"at most {hi}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return v
    return parse


def number(lo: float | None = None, hi: float | None = None):
    """An argparse type: a finite number within [lo, hi]."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            span = f" between {lo:g} and {hi:g}" if lo is not None and hi is not None else f" >= {lo:g}" \
                if lo is not None else ""
            raise argparse.ArgumentTypeError(f"must be a finite number{span}, got {text}")
        return v
    return parse


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


POSITIVE = integer(1)
SEED = integer(-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory, GGUF file or Hugging Face repo id (default: the bundled model)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--threads", type=POSITIVE, default=None,
                   help="intra-op threads, pinned (default: one per core, dropping to one thread per step while "
                        "that measures faster, e.g. when another program keeps a core busy)")
    p.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                   help="C++ CPU kernels: auto = qwen35.kernel_policy (on for quantized models and for models of 50M+ parameters)")
    add_quant_arg(p)
    add_kv_cache_arg(p)


def add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    from ..kv_storage import KV_CACHE_FORMATS

    p.add_argument("--kv-cache", choices=KV_CACHE_FORMATS, default="bf16",
                   help="how the attention layers store keys and values: bf16 (the model's dtype) or q8_0 "
                        "(8-bit blocks: ~half the memory and the decode bandwidth at long context; the Gated "
                        "DeltaNet state stays fp32); see the README's KV cache section")


def add_quant_arg(p: argparse.ArgumentParser) -> None:
    from ..quant.policy import POLICIES

    p.add_argument("--quant", choices=POLICIES, default=None,
                   help="quantize the weights at load: int8 / int4 (the recommended 8- and 4-bit policies) or a "
                        "layout for every matrix (q8_0, q4_0); see the README's quantization section")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model card's preset for the thinking mode in use)")
    g.add_argument("--temperature", type=number(0, 100), default=None, help="0 = greedy")
    g.add_argument("--top-p", type=number(0, 1), default=None)
    g.add_argument("--top-k", type=integer(0), default=None)
    g.add_argument("--min-p", type=number(0, 1), default=None)
    g.add_argument("--presence-penalty", type=number(-2, 2), default=None)
    g.add_argument("--frequency-penalty", type=number(-2, 2), default=None)
    g.add_argument("--repetition-penalty", type=number(0.01, 10), default=None)
    g.add_argument("--seed", type=SEED, default=None)
    g.add_argument("--max-tokens", type=POSITIVE, default=512)
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-turn tokens")
    s = p.add_argument_group("structured output and thinking budget (see the README)")
    shape = s.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", default=None,
                       help="the answer is JSON valid for this JSON schema (reasoning stays free)")
    shape.add_argument("--json-object", action="store_true", help="the answer is a JSON object")
    shape.add_argument("--regex", default=None, help="the answer matches this regular expression")
    shape.add_argument("--grammar", metavar="FILE", default=None, help="the answer follows this Lark grammar")
    s.add_argument("--max-thinking-tokens", type=integer(0), default=None,
                   help="close the reasoning with </think> after N tokens; the answer follows")
    s.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default=None,
                   help="a thinking budget by name (low 1024, medium 8192, high: none); --max-thinking-tokens wins")
    s.add_argument("--break-thinking-loops", action="store_true",
                   help="close the reasoning when it repeats the same span")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None, help="thinking mode on")
    think.add_argument("--no-think", dest="think", action="store_false", help="thinking mode off")


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (drafts from the checkpoint's MTP head; greedy output unchanged, "
                             "sampled output from the same distribution)")
    g.add_argument("--speculative", action="store_true", help="draft tokens with the MTP head, verify them in one forward")
    g.add_argument("--draft-tokens", type=integer(1, 7), default=None,
                   help="drafts per round (default: adaptive 1..4, off for a request when drafting is a loss)")
    g.add_argument("--draft-vocab", type=POSITIVE, default=None,
                   help="draft over the first N token ids only (BPE merge order: the most frequent tokens) plus the "
                        "end-of-turn ids: a cheaper draft head, same output (default: the full vocabulary)")


def check_speculative_flags(args: argparse.Namespace) -> None:
    """A bad flag combination is a bad flag: one line, exit 2, before the model loads."""
    if not getattr(args, "speculative", False):
        for flag in ("draft_tokens", "draft_vocab"):
            if getattr(args, flag, None) is not None:
                print(f"qwen35 {args.command}: error: --{flag.replace('_', '-')} needs --speculative", file=sys.stderr)
                raise SystemExit(2)


def speculation_from_args(args: argparse.Namespace, tokenizer=None):
    """A speculative.Speculation for --speculative (None without it); --draft-* without it is an error."""
    if not getattr(args, "speculative", False):
        return None
    from ..speculative import Speculation

    eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ()) if tokenizer is not None else ()
    return Speculation(draft_tokens=args.draft_tokens, draft_vocab=args.draft_vocab, always_draft=eos)


def sampling_from_args(args: argparse.Namespace, base: SamplingParams) -> SamplingParams:
    over = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                          "frequency_penalty", "repetition_penalty", "seed")
            if getattr(args, k, None) is not None}
    over["max_tokens"] = args.max_tokens
    over.update(structured_from_args(args))
    return replace(base, **over)


def structured_from_args(args: argparse.Namespace) -> dict:
    """SamplingParams fields for --json-schema / --json-object / --regex / --grammar and the thinking budget."""
    import json
    from pathlib import Path

    from ..constrain import Structured
    from ..guide import EFFORT_BUDGETS

    def read(flag: str, path: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise Qwen35Error(f"{flag} {path}: cannot read it ({e.strerror})") from None

    out: dict = {}
    if getattr(args, "json_schema", None):
        text = read("--json-schema", args.json_schema)
        try:
            out["structured"] = Structured.json_schema(json.loads(text))
        except json.JSONDecodeError as e:
            raise Qwen35Error(f"--json-schema {args.json_schema}: not valid JSON ({e})") from None
    elif getattr(args, "json_object", False):
        out["structured"] = Structured.json_object()
    elif getattr(args, "regex", None):
        out["structured"] = Structured.regex(args.regex)
    elif getattr(args, "grammar", None):
        out["structured"] = Structured.grammar(read("--grammar", args.grammar))
    budget = getattr(args, "max_thinking_tokens", None)
    if budget is None and getattr(args, "reasoning_effort", None):
        budget = EFFORT_BUDGETS[args.reasoning_effort]
    if budget is not None:
        out["max_thinking_tokens"] = budget
    if getattr(args, "break_thinking_loops", False):
        out["break_thinking_loops"] = True
    return out


def default_model() -> str:
    from pathlib import Path

    bundled = Path(__file__).resolve().parent.parent / "assets" / "model"
    if (bundled / "config.json").is_file():
        return str(bundled)
    raise Qwen35Error("no model given and no bundled model is installed; pass a checkpoint directory or repo id")


def load_from_args(args: argparse.Namespace):
    """Load the model for a command. Process-wide tuning that a library call must not do behind its
    caller's back happens here: threads, malloc thresholds, denormals, and gc.freeze() once the model is
    loaded."""
    import gc

    from .. import threads
    from ..api import load
    from ..runtime import flush_denormals, set_threads, tune_allocator

    n = set_threads(args.threads)
    if args.threads is None:
        threads.enable(n)
    tune_allocator()
    flush_denormals()  # for the process (runtime.py); library calls flush around each forward instead
    kernels = {"auto": None, "on": True, "off": False}[getattr(args, "kernels", "auto")]
    model, tokenizer = load(args.model or default_model(), dtype=DTYPES[args.dtype], progress=True, kernels=kernels,
                            quant=getattr(args, "quant", None), kv_cache=getattr(args, "kv_cache", "bf16"))
    # The model and tokenizer live as long as the process: move them (and everything imported so far) out of
    # the cyclic collector's view, so its full passes during decode no longer walk thousands of modules.
    gc.collect()
    gc.freeze()
    return model, tokenizer
