"""The Qwen3.5 vision tower: image patches -> embeddings at the language model's width.

Module and parameter names follow the checkpoint's `model.visual.*` keys (`patch_embed.proj`, `pos_embed`,
`blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.linear_fc1/mlp.linear_fc2`, `merger.norm/linear_fc1/linear_fc2`),
so loading is the prefix strip and nothing else.

What it computes, per image (or video frame) of grid (t, h, w) patches:
- patch embedding: a Conv3d whose kernel equals its stride and its whole input (temporal x 16 x 16), so it
  is one matrix product on the flattened patch (one GEMM instead of a convolution);
- plus a learned position embedding on a square grid (48 x 48 for the official sizes), bilinearly resampled
  (align_corners) to h x w;
- `depth` pre-LayerNorm blocks: attention with 2-D rotary positions (row, column) over each frame's own
  patches only (frames never attend to each other, so each runs as its own unmasked SDPA: no mask of
  N x N is ever built), then a GELU-tanh MLP;
- the merger: LayerNorm, each 2 x 2 block of neighbouring patches concatenated (the processor already
  ordered patches block by block), Linear, exact GELU, Linear to the text model's hidden size.
No deepstack and no windowed attention in Qwen3.5 (deepstack_visual_indexes is empty).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VISION_TOKEN_KEYS as TOKEN_KEYS
from ..errors import ConfigError


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    rope_theta: float = 10000.0
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_hf(cls, vision: dict[str, Any], source: str = "config.json") -> VisionConfig:
        """From the checkpoint's `vision_config` object (with the top-level token ids merged in by
        ModelConfig.from_hf)."""
        def get(key, default=None):
            v = vision.get(key, default)
            if v is None:
                raise ConfigError(f"{source}: vision_config is missing '{key}'")
            return v

        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"{source}: vision_config hidden_act {act!r} is not supported (Qwen3.5 uses "
                              "'gelu_pytorch_tanh')")
        if vision.get("deepstack_visual_indexes"):
            raise ConfigError(f"{source}: vision_config deepstack_visual_indexes is not supported (Qwen3.5 has none)")
        rope = vision.get("rope_parameters") or {}
        fields = {k: get(k) for k in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size")}
        for k in ("patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels",
                  "num_position_embeddings", *TOKEN_KEYS):
            if vision.get(k) is not None:
                fields[k] = vision[k]
        for k, v in fields.items():
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{source}: vision_config {k} must be a positive integer, got {v!r}")
        cfg = cls(**fields, rope_theta=float(rope.get("rope_theta", 10000.0)))
        side = round(cfg.num_position_embeddings**0.5)
        if side * side != cfg.num_position_embeddings:
            raise ConfigError(f"{source}: vision_config num_position_embeddings {cfg.num_position_embeddings} "
                              "is not a square grid")
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
            raise ConfigError(f"{source}: vision_config hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} "
                              "must give a head dim divisible by 4 (two rotary axes)")
        return cfg


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm with fp32 parameters on x in its own dtype (torch's CPU kernel accumulates in fp32 whatever
    the input: one pass over x, where casting x to fp32 and back would cost two more)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


def dense(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A biased Linear on 2-D x (the bias added inside the GEMM: no second pass over the output)."""
    return F.linear(x, layer.weight, layer.bias)


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        k = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, C*T*P*P] -> [N, hidden]. The kernel covers the whole patch: a matrix product."""
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.view(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seqlens: list[int]) -> torch.Tensor:
        """x [N, hidden]; rope cos/sin [N, head_dim] fp32; seqlens: patches per frame (sum N)."""
        N = x.shape[0]
        q, k, v = dense(x, self.qkv).view(N, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = rotate(q, *rope), rotate(k, *rope)
        outs, start = [], 0
        for n in seqlens:  # one frame at a time: bidirectional within it, nothing across
            qb, kb, vb = (t[start : start + n].transpose(0, 1)[None] for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qb, kb, vb)[0].transpose(0, 1))
            start += n
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return dense(out.reshape(N, -1), self.proj)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated over all D dims (NeoX halves), in fp32; cos/sin [N, D]."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(F.gelu(dense(x, self.linear_fc1), approximate="tanh"), self.linear_fc2)


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x, rope, seqlens):
        x = x + self.attn(layer_norm(x, self.norm1), rope, seqlens)
        return x + self.mlp(layer_norm(x, self.norm2))


class PatchMerger(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.merged = c.hidden_size * c.spatial_merge_size**2
        self.norm = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, c.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = layer_norm(x, self.norm).reshape(-1, self.merged)
        return dense(F.gelu(dense(x, self.linear_fc1)), self.linear_fc2)


class VisionModel(nn.Module):
    """`model(pixel_values [N, patch_dim], grid_thw [n, 3])` -> merged embeddings [N / merge^2, out_hidden]
    in the tower's dtype, images in order (image i owns t*h*w / merge^2 consecutive rows)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        quarter = config.head_dim // 4  # a quarter of the head's dims per axis per half (rows, then columns)
        self.inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float, device="cpu") / (2 * quarter))

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        grids = [tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
        total = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape != (total, self.config.patch_dim):
            raise ValueError(f"pixel_values must be [{total}, {self.config.patch_dim}] for grids {grids}, "
                             f"got {list(pixel_values.shape)}")
        x = self.patch_embed(pixel_values)
        x = x + self.position_embeddings(grids).to(x.dtype)
        rope = self.rotary(grids)
        seqlens = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, rope, seqlens)
        return self.merger(x)

    def _block_order(self, grid: torch.Tensor) -> torch.Tensor:
        """[h, w, ...] in raster order -> [h*w, ...] in merge-block order (the processor's patch order)."""
        m = self.config.spatial_merge_size
        h, w = grid.shape[:2]
        return grid.reshape(h // m, m, w // m, m, *grid.shape[2:]).transpose(1, 2).reshape(h * w, *grid.shape[2:])

    def position_embeddings(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """The learned square grid resampled bilinearly (corners aligned) to each frame: [N, hidden] fp32."""
        side = round(self.config.num_position_embeddings**0.5)
        table = self.pos_embed.weight.float().T.reshape(1, -1, side, side)
        out = []
        for t, h, w in grids:
            g = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)
            out.append(self._block_order(g).repeat(t, 1))
        return torch.cat(out)

    def rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim] (fp32): the first quarter of each half rotates by the patch's row, the
        second by its column."""
        pos = []
        for t, h, w in grids:
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            pos.append(self._block_order(torch.stack([rows, cols], -1)).repeat(t, 1))
        freqs = torch.cat(pos).float()[..., None] * self.inv_freq  # [N, 2, D/4]
        freqs = freqs.flatten(1)  # rows' frequencies, then columns'
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()
