"""Writing checkpoints in the official Qwen3.5 layout (config.json + safetensors shards + index).

Used by training to save what every other tool can load, by benchmarks to build full-size replicas with
random weights, and by tests. Shards are named like the official repos:
`model.safetensors-00001-of-00002.safetensors`, always listed in `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from .checkpoint_index import INDEX_FILE, VLM_TEXT_PREFIX
from .config import ModelConfig
from .safetensors_io import DTYPES

ST_DTYPES = {dtype: name for name, dtype in DTYPES.items()}  # torch dtype -> safetensors name


def shard_name(k: int, n: int) -> str:
    return f"model.safetensors-{k:05d}-of-{n:05d}.safetensors"


def write_checkpoint(tensors: dict[str, torch.Tensor], config: dict, out: str | Path,
                     max_shard_bytes: int | None = None) -> Path:
    """Write `tensors` (checkpoint key -> tensor, written in their own dtypes) and `config` to `out`.

    Tensors are split into shards of at most `max_shard_bytes` (one shard when None), in key order, and written
    one at a time straight from their memory (no copy of a shard: `qwen35 quantize` of a 9B holds only the
    model while it writes).
    """
    specs = [(key, tuple(tensors[key].shape), tensors[key].dtype) for key in sorted(tensors)]
    return _write_shards(specs, lambda key, shape, dtype: tensors[key].detach().contiguous(), config, out,
                         max_shard_bytes)


def _write_shards(specs, tensor_of, config: dict, out: str | Path, max_shard_bytes: int | None) -> Path:
    """config.json, shards and index for `specs` [(key, shape, dtype)], in that order; tensor_of(key, shape,
    dtype) gives each tensor as its bytes are written (asked for once each, in order). The safetensors layout
    is written by hand: a header (8-byte length, JSON, padded to 8 bytes) then each tensor's raw bytes, wider
    dtypes first so that every tensor is aligned to its element size."""
    groups: list[list] = [[]]
    size = 0
    for key, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, shape, dtype))
        size += nbytes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups, start=1):
        name = shard_name(k, len(groups))
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        # Data laid out by descending element size (as the safetensors library does): with the data 8-byte
        # aligned, every tensor then starts at a multiple of its own element size, so it can be viewed in
        # place (an odd-length fp16 scale array before an fp32 tensor would misalign it; the format allows
        # no gaps to pad with).
        for key, shape, dtype in sorted(group, key=lambda s: -s[2].itemsize):
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        data_start = 8 + len(raw)
        with open(out / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            # Tensors are still asked for in `specs` order (random replicas draw them in that order) and
            # written at their place in the layout.
            for key, shape, dtype in group:
                t = tensor_of(key, shape, dtype)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise ValueError(f"tensor '{key}' changed while being written")
                f.seek(data_start + header[key]["data_offsets"][0])
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                del t
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


def vlm_key(name: str) -> str:
    """Our parameter name -> the official VLM checkpoint key."""
    return VLM_TEXT_PREFIX + name[len("model."):] if name.startswith("model.") else name


CHUNK = 2**22  # elements drawn at once (a multiple of 16, see random_tensor): a 16 MiB fp32 working buffer, whatever the tensor's size


def tensor_specs(config: ModelConfig, mtp_layers: int = 0,
                 dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(checkpoint key, shape, dtype) of every tensor of a checkpoint, in the order random weights are drawn
    (the vision tower's last, when the config has one). A_log and linear_attn.norm are F32, as in the official
    checkpoints; the rest `dtype`."""
    from .checkpoint_index import parameter_shapes, skip_init

    specs = [(vlm_key(n), shape, torch.float32 if n.endswith(("A_log", "linear_attn.norm.weight")) else dtype)
             for n, shape in parameter_shapes(config, mtp_layers).items()]
    if config.vision_config is not None:  # the tower's tensors, `model.visual.*` as the official checkpoints
        from .checkpoint_index import VISION_PREFIX
        from .model.vision import VisionConfig, VisionModel

        with torch.device("meta"), skip_init():
            tower = VisionModel(VisionConfig.from_hf(config.vision_config))
        specs += [(VISION_PREFIX + n, tuple(p.shape), dtype) for n, p in tower.named_parameters()]
    return specs


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator,
                  std: float = 0.02) -> torch.Tensor:
    """One random weight, drawn from `gen` in CHUNK-element pieces straight into a `dtype` tensor (no fp32
    copy of a whole matrix). Norm weights and dt_bias get non-trivial values so that a replica exercises every
    formula. The one rule behind random_tensors and write_random_checkpoint."""
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    n = flat.numel()
    a = 0
    while a < n:
        # torch draws in runs of 16 (and a tensor under 16 another way), so pieces of a multiple of 16, with a
        # tail under 16 joined to the piece before it, give the values of one draw of the whole tensor
        m = n - a if n - a < CHUNK + 16 else CHUNK
        if key.endswith("A_log"):
            t = torch.empty(m).uniform_(0.01, 16, generator=gen).log_()
        elif key.endswith("dt_bias"):
            t = torch.rand(m, generator=gen) * 2
        elif key.endswith("linear_attn.norm.weight"):
            t = 1 + 0.1 * torch.randn(m, generator=gen)
        elif key.endswith("norm.weight"):
            t = 0.1 * torch.randn(m, generator=gen)
        else:
            t = torch.randn(m, generator=gen) * std
        flat[a : a + m] = t
        a += m
    return out


def random_tensors(config: ModelConfig, mtp_layers: int = 0, dtype: torch.dtype = torch.bfloat16,
                   seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights with the official key names and dtypes (A_log and linear_attn.norm in F32), all in
    memory; write_random_checkpoint writes the same tensors to disk holding one at a time."""
    gen = torch.Generator().manual_seed(seed)
    return {key: random_tensor(key, shape, d, gen, std) for key, shape, d in tensor_specs(config, mtp_layers, dtype)}


def write_random_checkpoint(config: dict, out: str | Path, mtp_layers: int | None = None,
                            max_shard_bytes: int | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            std: float = 0.02) -> Path:
    """Write a random-weight checkpoint of HF config dict `config` to `out`, tensor by tensor: peak memory is
    one tensor (a 9B bf16 replica, 19 GB on disk, is written in ~2 GB). The tensors equal
    random_tensors(config, mtp_layers, dtype, seed, std). mtp_layers: None = the config's
    mtp_num_hidden_layers. Shards of at most `max_shard_bytes` (one when None) in the order drawn, named and
    indexed like write_checkpoint's."""
    cfg = ModelConfig.from_hf(config)
    specs = tensor_specs(cfg, cfg.mtp_num_hidden_layers if mtp_layers is None else mtp_layers, dtype)
    gen = torch.Generator().manual_seed(seed)
    return _write_shards(specs, lambda key, shape, d: random_tensor(key, shape, d, gen, std), config, out,
                         max_shard_bytes)
