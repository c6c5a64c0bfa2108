"""Show a checkpoint's configuration, parameter count and memory needs.

Reads only config.json and the safetensors headers (or a GGUF's metadata and tensor index), so it is instant
even for large checkpoints. An mmproj GGUF (a vision tower, gguf/mmproj.py) is described as a tower; a GGUF's
description names the mmproj load_model would attach to it (found beside it).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

from ..checkpoint_index import read_checkpoint_entries
from ..config import ModelConfig
from ..errors import Qwen35Error
from ..memory import memory_plan, memory_size


def setup_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (config.json + safetensors) or GGUF file")
    from .common import POSITIVE, add_kv_cache_arg, add_quant_arg

    p.add_argument("--context", type=POSITIVE, default=None, help="context length to plan memory for "
                   "(default: max_position_embeddings)")
    p.add_argument("--memory", type=memory_size, default=None,
                   help="memory to fit in, e.g. 16GB or 512MB (binary units, as RAM is sold: 16GB = 16 GiB): "
                        "prints the largest context one sequence can hold in it")
    p.add_argument("--tensors", action="store_true", help="list every tensor's type, shape and size")
    add_quant_arg(p)
    add_kv_cache_arg(p)


def context_of(config: ModelConfig, args: argparse.Namespace) -> int:
    """--context, or the model's own; one past the model's is an error (generation refuses it)."""
    limit = config.max_position_embeddings
    if args.context is not None and args.context > limit:
        raise Qwen35Error(f"--context {args.context} exceeds the model's context of {limit} tokens "
                          f"(max_position_embeddings)")
    return args.context or limit


def print_plan(config: ModelConfig, context: int, weight_bytes: float, args: argparse.Namespace) -> None:
    """The context, KV, state and total lines, and with --memory the largest context that fits."""
    plan = memory_plan(config, context, args.kv_cache)
    gib = 1024**3
    print(f"context      {context} tokens: KV ({args.kv_cache}) {plan['kv_bytes'] / gib:.2f} GiB "
          f"({plan['kv_bytes_per_token'] / 1024:.1f} KiB/token), Gated DeltaNet state "
          f"{plan['deltanet_state_bytes'] / 1024**2:.1f} MiB (fp32, constant), per sequence")
    total = weight_bytes + plan["kv_bytes"] + plan["deltanet_state_bytes"]
    print(f"total        {total / gib:.2f} GiB for one sequence at {context} tokens (weights + KV + state)")
    if args.memory:
        room = args.memory - weight_bytes - plan["deltanet_state_bytes"]
        fits = max(0, int(room // plan["kv_bytes_per_token"]))
        limit = config.max_position_embeddings
        if args.memory < weight_bytes:
            print(f"fits         {args.memory / gib:.2f} GiB: no: the weights alone ({weight_bytes / gib:.2f} GiB) "
                  f"do not fit")
            return
        if fits == 0:
            print(f"fits         {args.memory / gib:.2f} GiB: no: the weights and the Gated DeltaNet state leave no "
                  f"room for a token of context")
            return
        note = f" (the model's own limit is {limit})" if fits > limit else ""
        print(f"fits         {args.memory / gib:.2f} GiB: up to {fits} tokens of context{note}; weights, KV "
              f"and state only: leave room for activations, the runtime and the OS")


def gguf_info(path: Path, args: argparse.Namespace) -> int:
    """A GGUF's architecture, and per tensor type: how many tensors, weights, bytes, bits per weight and what
    `load_model` makes of them (our kernels' layout as it is, converted to q8_0, or cast to a float dtype)."""
    from ..gguf import mmproj, names, open_gguf
    from ..gguf.loader import CONVERT_TO, _convertible, _gguf_shape, _native
    from ..gguf.metadata import config_dict

    f = open_gguf(path)
    if f.get("general.architecture") == mmproj.ARCH:
        return mmproj_info(f, args)
    config = ModelConfig.from_hf(config_dict(f), source=str(f.path))
    context = context_of(config, args)
    weight_bytes = f.nbytes
    if args.quant:  # what load_model does with it: refused on a quantized file, else matrices quantized at load
        from ..quant import policy
        from ..quant.formats import LAYOUTS
        from .common import gguf_quant_plan

        qplan, by_name, held = gguf_quant_plan(f, config, args.quant)
        if held:
            raise Qwen35Error(f"{path} is already quantized ({held}); run it without --quant")
        shapes = {n: tuple(int(s) for s in reversed(t.shape.tolist())) for n, t in by_name.items()}
        weight_bytes = f.nbytes - sum(by_name[n].n_bytes for n in qplan if n in by_name) + sum(
            math.prod(shapes[n]) * LAYOUTS[qplan[n]].bits_per_weight / 8 for n in qplan if n in by_name)
        qbits = policy.bits_per_weight({n: s for n, s in qplan.items() if n in by_name}, shapes)
    L = config.num_hidden_layers
    mtp = sum(t.n_elements for n, t in f.tensors.items() if n.startswith("blk.") and int(n.split(".")[1]) >= L)
    rows: dict[str, list] = {}
    for gname, t in f.tensors.items():
        n = names.our_name(gname, L)
        shape = tuple(reversed([int(s) for s in t.shape.tolist()]))
        if t.tensor_type.name in ("F32", "BF16"):
            fate = "as it is"
        elif t.tensor_type.name == "F16":
            fate = "cast to the model dtype"
        elif n is not None and (s := _native(n, t, _gguf_shape(n, shape), config)):
            fate = f"runs as {s}"
        elif n is not None and CONVERT_TO and _convertible(n, shape, config):
            fate = f"converted to {CONVERT_TO}"
        else:
            fate = "dequantized to the model dtype"
        r = rows.setdefault(t.tensor_type.name, [0, 0, 0, Counter()])
        r[0] += 1
        r[1] += t.n_elements
        r[2] += t.n_bytes
        r[3][fate] += 1
    params = sum(r[1] for r in rows.values())
    gib = 1024**3
    file_type = f.get("general.file_type")
    print(f"model        {path}  ({len(f.parts)} file(s), {sum(p.stat().st_size for p in f.parts) / gib:.2f} GiB)")
    print(f"architecture {f.get('general.architecture')}, name {f.get('general.name')!r}, "
          f"file type {FILE_TYPE_NAMES.get(file_type, file_type)}")
    print(f"layers       {L}: {len(config.linear_attention_layers)} Gated DeltaNet, "
          f"{len(config.full_attention_layers)} gated attention; hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, tied head: {config.tie_word_embeddings}")
    print(f"parameters   {params / 1e6:.1f}M (of which MTP {mtp / 1e6:.1f}M)")
    print(f"weights      {f.nbytes / 2**20:.1f} MiB, {f.nbytes * 8 / max(params, 1):.2f} bits per weight")
    tower_bytes = print_found_mmproj(path, config)
    print_tensor_table(f, rows, args)
    if args.quant:
        print(f"with --quant {args.quant}: weights {weight_bytes / gib:.2f} GiB, {qbits:.2f} bits per weight over "
              f"every tensor")
    print_plan(config, context, weight_bytes + tower_bytes, args)
    return 0


def print_tensor_table(f, rows: dict, args: argparse.Namespace) -> None:
    """Per tensor type (rows: type -> [count, weights, bytes, Counter of what qwen35 does with them]), and with
    --tensors every tensor's name, type, shape (GGUF order) and bytes."""
    print("tensors      type     count   weights       MiB   bits/w  in qwen35")
    for kind, (count, n, nbytes, fates) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        fate = "; ".join(f"{c} {what}" if len(fates) > 1 else what for what, c in fates.most_common())
        print(f"             {kind:<7} {count:6d} {n / 1e6:8.2f}M {nbytes / 2**20:9.2f}  {nbytes * 8 / n:7.3f}  {fate}")
    if getattr(args, "tensors", False):
        for gname, t in f.tensors.items():
            shape = "x".join(str(int(s)) for s in t.shape.tolist())
            print(f"  {gname:<40} {t.tensor_type.name:<6} {shape:<16} {t.n_bytes:>12,d} bytes")


def print_found_mmproj(path: Path, config: ModelConfig) -> int:
    """The mmproj line of a GGUF's description: the file load_model would attach (find_mmproj), or why it would
    refuse it. Returns the bytes its tower takes loaded in bf16 (the commands' default dtype; 0 where none)."""
    from ..gguf import mmproj, open_gguf

    found = mmproj.find_mmproj(path)
    if found is None:
        return 0
    try:
        f = open_gguf(found)
        vcfg = mmproj.tower_config(f, config.hidden_size)
        problems = mmproj.tensor_problems(f, vcfg)
        if problems:
            raise Qwen35Error(f"{f.path}: {problems[0]}")
    except Qwen35Error as e:
        print(f"mmproj       {found.name} beside it does not fit this model, so loading refuses it (--no-mmproj: "
              f"the text model alone): {e}")
        return 0
    n = sum(t.n_elements for t in f.tensors.values())
    print(f"mmproj       {found.name} beside it, attached at load (--no-mmproj skips it): a {vcfg.depth}-block vision "
          f"tower, {n / 1e6:.1f}M parameters, {f.nbytes / 2**20:.1f} MiB ({2 * n / 2**20:.1f} MiB in bf16, "
          f"counted in the total)")
    return 2 * n


def mmproj_info(f, args: argparse.Namespace) -> int:
    """An mmproj GGUF (a Qwen3.5 vision tower as llama.cpp keeps it): its projector, the tower's sizes, the
    processor's patching and normalization, and per tensor type what the file holds."""
    from ..gguf import mmproj

    flags = {"--quant": args.quant, "--context": args.context, "--memory": args.memory,
             "--kv-cache": args.kv_cache if args.kv_cache != "bf16" else None}
    for flag, v in flags.items():
        if v is not None:
            raise Qwen35Error(f"{f.path} is an mmproj (a vision tower): {flag} describes a text model; run "
                              "`qwen35 info` on the text GGUF it belongs to")
    vcfg = mmproj.tower_config(f)
    rows: dict[str, list] = {}
    for t in f.tensors.values():
        kind = t.tensor_type.name
        fate = "read in the model dtype" if kind in ("F32", "F16", "BF16") else "dequantized to the model dtype"
        r = rows.setdefault(kind, [0, 0, 0, Counter()])
        r[0] += 1
        r[1] += t.n_elements
        r[2] += t.n_bytes
        r[3][fate] += 1
    params = sum(r[1] for r in rows.values())
    file_type = f.get("general.file_type")
    side = round(vcfg.num_position_embeddings**0.5)
    mean, std = (tuple(round(float(v), 6) for v in f.get(f"clip.vision.{k}")) for k in ("image_mean", "image_std"))
    print(f"mmproj       {f.path}  ({len(f.parts)} file(s), {sum(p.stat().st_size for p in f.parts) / 2**20:.1f} MiB)")
    print(f"architecture {f.get('general.architecture')} (an mmproj: a vision tower), projector "
          f"{f.get('clip.projector_type') or f.get('clip.vision.projector_type')}, name {f.get('general.name')!r}, "
          f"file type {FILE_TYPE_NAMES.get(file_type, file_type)}")
    print(f"tower        {vcfg.depth} blocks, hidden {vcfg.hidden_size}, {vcfg.num_heads} heads x {vcfg.head_dim}, "
          f"MLP {vcfg.intermediate_size}, {vcfg.num_position_embeddings} positions ({side} x {side})")
    print(f"patches      {vcfg.patch_size} x {vcfg.patch_size} pixels x {vcfg.temporal_patch_size} frames, "
          f"{vcfg.spatial_merge_size} x {vcfg.spatial_merge_size} merged into one token; pixels normalized by "
          f"mean {mean}, std {std}")
    print(f"projection   {vcfg.out_hidden_size} dims: for a text model of hidden size {vcfg.out_hidden_size}")
    print(f"parameters   {params / 1e6:.1f}M")
    print(f"weights      {f.nbytes / 2**20:.1f} MiB, {f.nbytes * 8 / max(params, 1):.2f} bits per weight")
    print_tensor_table(f, rows, args)
    return 0


# llama.cpp's llama_ftype values (llama.h) for the file types common files carry
FILE_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                   17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def main(args: argparse.Namespace) -> int:
    from ..gguf.reader import is_gguf_path
    path = Path(args.model)
    if is_gguf_path(path):
        return gguf_info(path, args)
    config = ModelConfig.from_file(path)
    context = context_of(config, args)
    entries, files = read_checkpoint_entries(path)
    text = {k: e for k, e in entries.items() if not k.startswith("model.visual.")}

    from ..quant import formats
    from ..quant.checkpoint import read_quant_config

    stored = read_quant_config(path)
    if stored and args.quant not in (None, stored.get("policy")):  # load_model refuses it the same way
        from ..errors import CheckpointError

        raise CheckpointError(f"{path} is already quantized ({stored.get('policy')}); run it without --quant, or "
                              f"quantize the original checkpoint with {args.quant}")
    layouts = (stored or {}).get("tensors", {})

    def numel(k, e):  # a stored quantized matrix counts its weights, from its qs bytes and its layout
        if k.endswith(".d") and k[:-2] in layouts:
            return 0
        if k.endswith(".qs") and k[:-3] in layouts:
            lay = formats.layout(layouts[k[:-3]])
            return e.shape[0] * (e.shape[1] // lay.block_bytes * lay.block)
        return math.prod(e.shape)

    params = sum(numel(k, e) for k, e in text.items())
    mtp = sum(numel(k, e) for k, e in text.items() if k.startswith("mtp."))
    vision = sum(math.prod(e.shape) for k, e in entries.items() if k.startswith("model.visual."))
    weight_bytes = sum(e.nbytes for e in text.values())
    gib = 1024**3
    print(f"model        {path}  ({config.model_type}, {len(files)} file(s))")
    print(f"layers       {config.num_hidden_layers}: {len(config.linear_attention_layers)} Gated DeltaNet, "
          f"{len(config.full_attention_layers)} gated attention at {list(config.full_attention_layers)}")
    print(f"hidden       {config.hidden_size}, MLP {config.intermediate_size}, vocab {config.vocab_size}, "
          f"tied head: {config.tie_word_embeddings}")
    print(f"attention    {config.num_attention_heads} q / {config.num_key_value_heads} kv heads x {config.head_dim}, "
          f"rotary {config.rotary_dim} dims, theta {config.rope_theta:g}, rope {config.rope_type}")
    print(f"deltanet     {config.linear_num_key_heads} qk / {config.linear_num_value_heads} v heads, "
          f"dims {config.linear_key_head_dim}/{config.linear_value_head_dim}, conv {config.linear_conv_kernel_dim}")
    print(f"parameters   {params / 1e6:.1f}M text (of which MTP {mtp / 1e6:.1f}M), vision {vision / 1e6:.1f}M "
          f"(not loaded)")
    print(f"weights      {weight_bytes / gib:.2f} GiB on disk (text + MTP)")
    if stored:
        print(f"quantized    {stored.get('policy')} ({len(stored['tensors'])} matrices), as stored")
    if args.tensors:
        for k, e in entries.items():
            shape = "x".join(str(s) for s in e.shape)
            where = f" ({e.file.name})" if len(files) > 1 else ""
            print(f"  {k:<40} {str(e.dtype).removeprefix('torch.'):<8} {shape:<16} {e.nbytes:>12,d} bytes{where}")
    if args.quant and not stored:
        from ..checkpoint_index import to_module_name
        from ..quant import policy
        from ..quant.formats import LAYOUTS

        layout = "vlm" if any(k.startswith("model.language_model.") for k in text) else "text"
        shapes = {n: tuple(e.shape) for k, e in text.items() if (n := to_module_name(k, layout)) is not None}
        if config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        qplan = policy.plan(args.quant, shapes, config.tie_word_embeddings)
        q_bytes = sum(math.prod(s) * (LAYOUTS[qplan[n]].bits_per_weight / 8 if n in qplan else text_bytes(text, n, layout))
                      for n, s in shapes.items())
        weight_bytes = q_bytes
        print(f"with --quant {args.quant}: weights {q_bytes / gib:.2f} GiB, "
              f"{policy.bits_per_weight(qplan, shapes):.2f} bits per weight over every tensor")
    print_plan(config, context, weight_bytes, args)
    return 0


def text_bytes(text: dict, name: str, layout: str) -> float:
    """Bytes per element of an unquantized tensor as the checkpoint stores it."""
    key = ("model.language_model." + name[len("model."):]) if layout == "vlm" and name.startswith("model.") else name
    return text[key].dtype.itemsize if key in text else 2
