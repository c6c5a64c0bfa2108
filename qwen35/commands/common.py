"""Flags shared by the commands that generate: model, dtype, threads and sampling; and the argparse types
that refuse a bad value at start with one line (`--threads 0`, `--temperature inf`, `--port 99999`)."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

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


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0 (a size: 0 or less would write one file per tensor)."""
    v = number()(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def top_p(text: str) -> float:
    """An argparse type: the sampler's rule for top_p, in (0, 1] (0 would keep no token at all)."""
    v = number(0, 1)(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text} (for greedy use --temperature 0)")
    return v


def check_utf8(text: str, what: str) -> str:
    """`text` as Python decoded it from argv or stdin: bytes that are not UTF-8 arrive as lone surrogates
    (surrogateescape), which the tokenizer then refuses with a TypeError; say whose bytes they are."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(e.object[e.start])
        byte = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"character U+{bad:04X}"
        raise Qwen35Error(f"{what} is not valid UTF-8 text ({byte} at character {e.start})") from None
    return text


def utf8(text: str) -> str:
    """An argparse type: text that is valid UTF-8 (see check_utf8)."""
    try:
        return check_utf8(text, "the text")
    except Qwen35Error as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("the text is ")) from None


def read_stdin(what: str = "stdin") -> str:
    """All of stdin as text, non-UTF-8 bytes an error naming it (strict or surrogateescape decoding alike)."""
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as e:
        raise Qwen35Error(f"{what} is not valid UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
    return check_utf8(text, what)


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return utf8(text)


POSITIVE = integer(1)
SEED = integer(-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def check_output_dir(out: Path, source: Path | None = None) -> None:
    """Before anything loads: OUT must be a directory to create or fill, not a file, not under a file, and
    not the source checkpoint (writing there replaces the weights and config being read, whatever path
    spells it: a trailing slash, a symlink). A folder inside the source is fine: loaders read only the
    checkpoint's own top level."""
    _check_ancestors(out)
    if out.exists() and not out.is_dir():
        raise Qwen35Error(f"{out}: exists and is not a directory (the output is a directory)")
    if source is not None and out.resolve() == Path(source).resolve():
        raise Qwen35Error(f"output {out} is the source checkpoint {source}: write to another directory")


def check_output_file(out: Path) -> None:
    """Before anything loads: OUT must be a file to create or replace, in a folder that exists."""
    _check_ancestors(out)
    if out.is_dir():
        raise Qwen35Error(f"{out}: is a directory (the output is a file)")
    if not out.parent.is_dir():
        raise Qwen35Error(f"{out}: the folder {out.parent} does not exist")


def _check_ancestors(out: Path) -> None:
    for parent in out.absolute().parents:  # the nearest one that exists must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise Qwen35Error(f"{out}: {parent} is a file, not a folder")
            return


CHECKPOINT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")


def checkpoint_files(out: Path) -> list[str]:
    """The names of the checkpoint files (config, shards, index) at the top level of folder `out`."""
    return sorted({f.name for pattern in CHECKPOINT_FILES for f in out.glob(pattern)}) if out.is_dir() else []


def check_no_checkpoint(out: Path, found: list[str] | None = None,
                        why: str = "already holds checkpoint files") -> None:
    """A checkpoint written over another leaves the old one's extra shards beside it: refuse, naming them
    (`found`: the files at fault, default every checkpoint file in `out`)."""
    found = checkpoint_files(out) if found is None else found
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise Qwen35Error(f"{out} {why} ({', '.join(found[:3])}{more}): write to a new or empty directory, or "
                          f"remove them first")


def check_quant_flag(model: str | Path | None, quant: str | None) -> None:
    """Before anything loads: --quant on a checkpoint already quantized another way is refused, as load_model
    refuses it but in the flag's words (load_model names its quant= parameter). A repo id is checked by the
    load itself, once it is resolved."""
    if quant is None or model is None or not Path(model).expanduser().exists():
        return
    path = Path(model).expanduser()
    from ..gguf.reader import is_gguf_path

    if is_gguf_path(path):
        held = gguf_quant_conflict(path, quant)
        if held:
            raise Qwen35Error(f"{path} is already quantized ({held}); run it without --quant")
        return
    from ..config import ModelConfig
    from ..quant.checkpoint import read_quant_config

    if not path.is_dir():
        return
    ModelConfig.from_file(path)  # a missing or broken config.json: named as the load names it
    stored = read_quant_config(path)
    if stored and quant != stored.get("policy"):
        raise Qwen35Error(f"{path} is already quantized ({stored.get('policy')}); run it without --quant, or "
                          f"quantize the original checkpoint with {quant}")


def gguf_quant_plan(f, config, quant: str) -> tuple[dict, dict, str | None]:
    """What load_gguf does with quant=`quant` on the opened GGUF `f` (its rule, in its terms): a tuple of
    the layout of each matrix quantized at load, the file's tensors by parameter name, and the file's quantized
    types where it is already quantized otherwise (the load refuses quant= then; None where it applies)."""
    from ..checkpoint_index import parameter_shapes
    from ..gguf.loader import _match, quant_plan

    shapes = parameter_shapes(config, config.mtp_num_hidden_layers)
    by_name = _match(f, config, shapes)[0]
    _, _, plan, held = quant_plan(config, shapes, by_name, quant)
    return plan, by_name, held


def gguf_quant_conflict(path: Path, quant: str) -> str | None:
    """The GGUF's quantized types where load_gguf refuses quant=`quant` on it, else None."""
    from ..config import ModelConfig
    from ..gguf import open_gguf
    from ..gguf.metadata import config_dict

    f = open_gguf(path)
    return gguf_quant_plan(f, ModelConfig.from_hf(config_dict(f), source=str(f.path)), quant)[2]


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
    add_mmproj_arg(p)


def add_mmproj_arg(p: argparse.ArgumentParser) -> None:
    """--mmproj PATH / --no-mmproj, one dest: a path, False (none) or None (load_model finds one: a GGUF's
    mmproj-<stem>.gguf beside it)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mmproj", type=Path, default=None, metavar="PATH",
                   help="a llama.cpp mmproj GGUF (the vision tower `qwen35 export` writes beside a GGUF as "
                        "mmproj-<name>.gguf) to give MODEL images; for a model without a tower of its own "
                        "(default: a GGUF's mmproj-<name>.gguf beside it, where there is one)")
    g.add_argument("--no-mmproj", dest="mmproj", action="store_const", const=False,
                   help="do not attach the mmproj-<name>.gguf found beside a GGUF MODEL: the text model alone")


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
                        "layout for every matrix (q8_0, q4_0, q4_k, q6_k); see the README's quantization section")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model card's preset for the thinking mode in use)")
    g.add_argument("--temperature", type=number(0, 100), default=None, help="0 = greedy")
    g.add_argument("--top-p", type=top_p, default=None)
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
    shape.add_argument("--regex", type=utf8, default=None, help="the answer matches this regular expression")
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


def refuse(args: argparse.Namespace, message: str) -> NoReturn:
    """A bad flag combination is a bad flag: one line, exit 2, before the model loads."""
    print(f"qwen35 {args.command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_speculative_flags(args: argparse.Namespace) -> None:
    if not getattr(args, "speculative", False):
        for flag in ("draft_tokens", "draft_vocab"):
            if getattr(args, flag, None) is not None:
                refuse(args, f"--{flag.replace('_', '-')} needs --speculative")


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Flags SamplingParams would refuse by their parameter names (ignore_eos=True with structured output):
    refused by their flags, before the model loads."""
    if getattr(args, "ignore_eos", False):
        for flag in ("json_schema", "json_object", "regex", "grammar"):
            if getattr(args, flag, None):
                refuse(args, f"--ignore-eos cannot be combined with --{flag.replace('_', '-')} (the grammar ends "
                             f"the answer)")


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
    if getattr(args, "ignore_eos", False):
        over["ignore_eos"] = True
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
        except UnicodeDecodeError as e:
            raise Qwen35Error(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None

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

    check_quant_flag(args.model, getattr(args, "quant", None))
    n = set_threads(args.threads)
    if args.threads is None:
        threads.enable(n)
    tune_allocator()
    flush_denormals()  # for the process (runtime.py); library calls flush around each forward instead
    kernels = {"auto": None, "on": True, "off": False}[getattr(args, "kernels", "auto")]
    model, tokenizer = load(args.model or default_model(), dtype=DTYPES[args.dtype], progress=True, kernels=kernels,
                            quant=getattr(args, "quant", None), kv_cache=getattr(args, "kv_cache", "bf16"),
                            mmproj=getattr(args, "mmproj", None))
    if getattr(model, "mmproj_found", None) is not None:  # a file the user did not name: say which
        print(f"vision tower: {model.mmproj_found}, found beside the model (--no-mmproj: the text model alone)",
              file=sys.stderr)
    # The model and tokenizer live as long as the process: move them (and everything imported so far) out of
    # the cyclic collector's view, so its full passes during decode no longer walk thousands of modules.
    gc.collect()
    gc.freeze()
    return model, tokenizer
