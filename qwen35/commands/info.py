"""Show a checkpoint's configuration, parameter count and memory needs.

Reads only config.json and the safetensors headers (or a GGUF's metadata and tensor index), so it is instant
even for large checkpoints.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..config import ModelConfig
from ..weights import read_checkpoint_entries


def setup_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (config.json + safetensors) or GGUF file")
    from .common import POSITIVE, add_kv_cache_arg, add_quant_arg

    p.add_argument("--context", type=POSITIVE, default=None, help="context length to plan memory for "
                   "(default: max_position_embeddings)")
    p.add_argument("--memory", type=memory_size, default=None,
                   help="memory to fit in, e.g. 16GB or 512MB (binary units, as RAM is sold: 16GB = 16 GiB): "
                        "prints the largest context one sequence can hold in it")
    add_quant_arg(p)
    add_kv_cache_arg(p)


def memory_size(text: str) -> int:
    """An argparse type: '16GB', '16G', '16GiB', '512MB' or a byte count -> bytes (K/M/G/T: powers of 1024)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a size like 16GB or 512MB, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def memory_plan(config: ModelConfig, context: int, kv_cache: str = "bf16") -> dict[str, float]:
    """Per-sequence state in bytes (a bf16 model): KV of the full-attention layers in format `kv_cache`
    (kv_storage.py) and the constant Gated DeltaNet state (fp32 recurrent state, bf16 conv state)."""
    import torch

    from ..kv_storage import kv_bytes_per_token

    kv_per_token = len(config.full_attention_layers) * kv_bytes_per_token(
        kv_cache, config.num_key_value_heads, config.head_dim, torch.bfloat16)
    gdn = len(config.linear_attention_layers) * (
        config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
        + (config.linear_conv_kernel_dim - 1) * config.linear_conv_dim * 2)
    return {"kv_bytes_per_token": kv_per_token, "kv_bytes": kv_per_token * context, "deltanet_state_bytes": gdn}


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
        note = f" (the model's own limit is {limit})" if fits > limit else ""
        print(f"fits         {args.memory / gib:.2f} GiB: up to {fits} tokens of context{note}; weights, KV "
              f"and state only: leave room for activations, the runtime and the OS")


def gguf_info(path: Path, args: argparse.Namespace) -> int:
    from collections import Counter

    from ..gguf import open_gguf
    from ..gguf.loader import read_config

    config, f = read_config(path), open_gguf(path)
    L = config.num_hidden_layers
    params = sum(t.n_elements for t in f.tensors.values())
    mtp = sum(t.n_elements for n, t in f.tensors.items() if n.startswith(f"blk.{L}.") or
              (n.startswith("blk.") and int(n.split(".")[1]) > L))
    types = Counter(t.tensor_type.name for t in f.tensors.values())
    context = args.context or config.max_position_embeddings
    gib = 1024**3
    print(f"model        {path}  (GGUF {f.get('general.architecture')}, {len(f.parts)} file(s))")
    print(f"layers       {L}: {len(config.linear_attention_layers)} Gated DeltaNet, "
          f"{len(config.full_attention_layers)} gated attention; hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, tied head: {config.tie_word_embeddings}")
    print(f"parameters   {params / 1e6:.1f}M (of which MTP {mtp / 1e6:.1f}M)")
    print(f"tensors      {', '.join(f'{c} {k}' for k, c in types.most_common())}; "
          f"weights {f.nbytes / gib:.2f} GiB")
    print_plan(config, context, f.nbytes, args)
    return 0


def main(args: argparse.Namespace) -> int:
    path = Path(args.model)
    if path.suffix == ".gguf":
        return gguf_info(path, args)
    config = ModelConfig.from_file(path)
    entries, files = read_checkpoint_entries(path)
    text = {k: e for k, e in entries.items() if not k.startswith("model.visual.")}

    def numel(k, e):  # a stored quantized matrix counts its weights, not its bytes: N x (32 x scale count)
        if k.endswith(".qs"):
            return 0
        return math.prod(e.shape) * (32 if k.endswith(".weight.d") else 1)

    params = sum(numel(k, e) for k, e in text.items())
    mtp = sum(numel(k, e) for k, e in text.items() if k.startswith("mtp."))
    vision = sum(math.prod(e.shape) for k, e in entries.items() if k.startswith("model.visual."))
    weight_bytes = sum(e.nbytes for e in text.values())
    context = args.context or config.max_position_embeddings
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
    from ..quant.checkpoint import read_quant_config

    stored = read_quant_config(path)
    if stored:
        print(f"quantized    {stored.get('policy')} ({len(stored['tensors'])} matrices), as stored")
    if args.quant and not stored:
        from ..quant import policy
        from ..quant.formats import LAYOUTS
        from ..weights import to_module_name

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
