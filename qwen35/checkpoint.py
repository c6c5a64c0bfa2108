"""Writing checkpoints in the official Qwen3.5 layout (config.json + safetensors shards + index).

Used by training to save what every other tool can load, by benchmarks to build full-size replicas with
random weights, and by tests. Shards are named like the official repos:
`model.safetensors-00001-of-00002.safetensors`, always listed in `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .weights import INDEX_FILE, VLM_TEXT_PREFIX


def shard_name(k: int, n: int) -> str:
    return f"model.safetensors-{k:05d}-of-{n:05d}.safetensors"


def write_checkpoint(tensors: dict[str, torch.Tensor], config: dict, out: str | Path,
                     max_shard_bytes: int | None = None) -> Path:
    """Write `tensors` (checkpoint key -> tensor, written in their own dtypes) and `config` to `out`.

    Tensors are split into shards of at most `max_shard_bytes` (one shard when None), in key order.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups, start=1):
        name = shard_name(k, len(groups))
        save_file(group, str(out / name), metadata={"format": "pt"})
        for key, t in group.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


def vlm_key(name: str) -> str:
    """Our parameter name -> the official VLM checkpoint key."""
    return VLM_TEXT_PREFIX + name[len("model."):] if name.startswith("model.") else name


def random_tensors(config: ModelConfig, mtp_layers: int = 0, dtype: torch.dtype = torch.bfloat16,
                   seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights with the official key names and dtypes (A_log and linear_attn.norm in F32).

    Norm weights and dt_bias get non-trivial values so that a replica exercises every formula.
    """
    from .model.qwen35 import Qwen35ForCausalLM
    from .weights import _skip_init

    with torch.device("meta"), _skip_init():
        shapes = {n: p.shape for n, p in Qwen35ForCausalLM(config, mtp_layers=mtp_layers).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("A_log"):
            t = torch.empty(shape).uniform_(0.01, 16, generator=gen).log_()
        elif name.endswith("dt_bias"):
            t = torch.rand(shape, generator=gen) * 2
        elif name.endswith("linear_attn.norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("norm.weight"):
            t = 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * std
        f32 = name.endswith(("A_log", "linear_attn.norm.weight"))
        out[vlm_key(name)] = t if f32 else t.to(dtype)
    return out
