"""Qwen3.5 text model: embedding -> decoder layers (Gated DeltaNet or gated attention) -> norm -> head.

Module and parameter names follow the HF checkpoint (`model.embed_tokens`, `model.layers.{i}.linear_attn.*`,
`model.layers.{i}.self_attn.*`, `model.norm`, `lm_head`, `mtp.*`), so loading is a short name mapping and
a state dict round-trips. State lives in a caller-owned HybridCache (`make_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.dispatch import fast_path_ok
from ..ops.linear import Linear, fuse_linears, fused_weight, linear

from ..cache import DeltaNetState, HybridCache, KVCache
from ..config import ModelConfig
from ..errors import Qwen35Error
from .attention import GatedAttention
from .deltanet import GatedDeltaNet
from .mlp import MLP
from .mtp import MTPHead
from .norm import RMSNorm
from .rope import RotaryEmbedding


_NO_PAD = torch.empty(0, dtype=torch.long)
LAYER_KERNELS = True  # whole-layer decode kernels; False runs the per-op fast path (for comparison)


class InputError(Qwen35Error, ValueError):
    """A forward call got inputs it cannot process (wrong shape, dtype, token id or cache)."""


@dataclass(frozen=True)
class PaddingMasks:
    """Masks for a left-padded batch whose new tokens occupy cache slots offset..offset+T-1.

    attn: [B, 1, T, offset+T] bool (True = may attend: causal, never a padding key; a padding query sees
          only itself so no row is empty); tokens: [B, T] bool (True = real token); pad: [B] padding
          lengths; positions: [B, T] (each sequence counts from its first real token).
    """

    attn: torch.Tensor
    tokens: torch.Tensor
    pad: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def build(cls, pad: torch.Tensor, offset: int, T: int) -> PaddingMasks:
        q_idx = torch.arange(offset, offset + T, device=pad.device)
        k_idx = torch.arange(offset + T, device=pad.device)
        tokens = q_idx[None] >= pad[:, None]
        causal = k_idx[None, :] <= q_idx[:, None]  # [T, S]
        attn = causal[None] & (k_idx[None, None, :] >= pad[:, None, None])
        attn = attn | ((k_idx[None, None, :] == q_idx[None, :, None]) & ~tokens[:, :, None])
        positions = (q_idx[None] - pad[:, None]).clamp(min=0)
        return cls(attn[:, None], tokens, pad, positions)


@dataclass(frozen=True)
class SegmentMasks:
    """Masks for packed training sequences: several documents per row, none may see another.

    segments: [B, T] document ids. attn: [B, 1, T, T] causal within a document; starts: [B, T] first token
    of each document (the Gated DeltaNet state resets there); taps: [B, T, K] conv taps that stay inside the
    token's document; positions: [B, T] counted from each document's start.
    """

    attn: torch.Tensor
    starts: torch.Tensor
    taps: torch.Tensor
    positions: torch.Tensor
    pad = None
    tokens = None

    @classmethod
    def build(cls, segments: torch.Tensor, kernel_size: int) -> SegmentMasks:
        B, T = segments.shape
        idx = torch.arange(T, device=segments.device)
        same = segments[:, :, None] == segments[:, None, :]
        attn = same & (idx[None, :] <= idx[:, None])[None]
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        first = torch.where(starts, idx[None].expand(B, T), torch.zeros_like(segments))
        positions = idx[None] - first.cummax(dim=1).values
        taps = torch.zeros(B, T, kernel_size, dtype=torch.bool, device=segments.device)
        for j in range(kernel_size):
            back = kernel_size - 1 - j
            if back == 0:
                taps[..., j] = True
            else:
                taps[:, back:, j] = segments[:, back:] == segments[:, :-back]
        return cls(attn[:, None], starts, taps.float(), positions)


class DecoderLayer(nn.Module):
    """h = x + mixer(norm(x)); y = h + mlp(norm(h)); the mixer is chosen by the layer type."""

    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope, cache: KVCache | DeltaNetState | None = None,
                masks: PaddingMasks | None = None) -> torch.Tensor:
        if x.shape[1] == 1 and cache is not None and LAYER_KERNELS and fast_path_ok(x, (torch.bfloat16,)):
            out = self._decode_fast(x, rope, cache, masks)
            if out is not None:
                return out
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            if isinstance(masks, SegmentMasks):
                h = self.linear_attn(h, cache, segments=masks)
            else:
                h = self.linear_attn(h, cache, token_mask=None if masks is None else masks.tokens)
        else:
            h = self.self_attn(h, rope, cache, masks=masks)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


    def _decode_fast(self, x: torch.Tensor, rope, cache, masks: PaddingMasks | None) -> torch.Tensor | None:
        """The whole layer in one C++ call for a decode step (None when a piece lacks its fast form)."""
        mlp = self.mlp
        gate_up = fused_weight(mlp._gate_up, mlp.gate_proj, mlp.up_proj)
        if gate_up is None or mlp.gate_proj.weight.shape[0] % 16:
            return None
        B, _, H = x.shape
        x2 = x.reshape(B, H)
        eps = self.input_layernorm.eps
        if self.layer_type == "linear_attention":
            gdn = self.linear_attn
            w_in = fused_weight(gdn._in_proj, gdn.in_proj_qkv, gdn.in_proj_z, gdn.in_proj_b, gdn.in_proj_a)
            if (w_in is None or cache.conv.dtype != torch.bfloat16 or not gdn._decode_kernel_ok
                    or (masks is not None and not bool(masks.tokens.all()))):
                return None
            out, cache.conv, cache.recurrent = torch.ops.qwen35.decode_gdn_layer(
                x2, self.input_layernorm.weight, w_in, cache.conv.contiguous(), gdn.conv1d.weight[:, 0].contiguous(),
                gdn.A_log, gdn.dt_bias, cache.recurrent.contiguous(), gdn.norm.weight, gdn.out_proj.weight,
                self.post_attention_layernorm.weight, gate_up, mlp.down_proj.weight, gdn.num_k_heads, eps)
            return out.view(B, 1, H)
        attn = self.self_attn
        w_qkv = fused_weight(attn._qkv, attn.q_proj, attn.k_proj, attn.v_proj)
        if w_qkv is None or not attn._decode_kernel_ok or cache.dtype != torch.bfloat16:
            return None
        buf = cache._writable(cache.length + 1)
        cos, sin = rope
        pad = masks.pad if masks is not None else _NO_PAD
        out = torch.ops.qwen35.decode_attn_layer(
            x2, self.input_layernorm.weight, w_qkv, attn.q_norm.weight, attn.k_norm.weight,
            cos.reshape(cos.shape[0], -1).contiguous(), sin.reshape(sin.shape[0], -1).contiguous(), buf.k, buf.v,
            cache.length, pad, attn.o_proj.weight, self.post_attention_layernorm.weight, gate_up,
            mlp.down_proj.weight, attn.num_heads, eps)
        cache.length += 1
        return out.view(B, 1, H)


class TextModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen35ForCausalLM(nn.Module):
    """The Qwen3.5 language model. `model(input_ids, cache=None)` -> fp32 logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig, mtp_layers: int = 0):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.mtp = MTPHead(config, mtp_layers) if mtp_layers > 0 else None
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False  # training: recompute each layer's activations in backward

    def fusion_groups(self) -> list[tuple[nn.Module, str, list[nn.Linear]]]:
        """Projections that share an input, per layer: (owner, attribute for the fused matrix, linears)."""
        groups = []
        for layer in [*self.model.layers, *(self.mtp.layers if self.mtp is not None else [])]:
            mixer = layer.linear_attn if layer.layer_type == "linear_attention" else layer.self_attn
            groups.append(mixer.fusion_group())
            groups.append(layer.mlp.fusion_group())
        return groups

    def fuse_projections(self) -> None:
        """Concatenate projections that share an input (q|k|v, qkv|z|b|a, gate|up) so each is one weight
        stream; parameters become views of the fused matrices, names and values unchanged. (The loader
        reads checkpoints straight into fused storage instead.)"""
        for owner, attr, linears in self.fusion_groups():
            setattr(owner, attr, fuse_linears(*linears))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def head_weight(self) -> torch.Tensor:
        """The vocabulary projection [vocab, hidden]: lm_head, or the embedding when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def make_cache(self, batch_size: int = 1) -> HybridCache:
        """Empty state for `batch_size` sequences, one entry per decoder layer."""
        c = self.config
        layers: list[KVCache | DeltaNetState] = []
        for t in c.layer_types:
            if t == "full_attention":
                layers.append(KVCache(batch_size, c.num_key_value_heads, c.head_dim, self.dtype, self.device))
            else:
                layers.append(DeltaNetState(batch_size, c.linear_conv_dim, c.linear_conv_kernel_dim,
                                            c.linear_num_value_heads, c.linear_key_head_dim,
                                            c.linear_value_head_dim, self.dtype, self.device))
        return HybridCache(layers, batch_size)

    def make_mtp_cache(self, batch_size: int = 1) -> list[KVCache]:
        """KV caches for the MTP head's own attention layers."""
        if self.mtp is None:
            raise InputError("this checkpoint has no MTP head (no mtp.* tensors)")
        c = self.config
        return [KVCache(batch_size, c.num_key_value_heads, c.head_dim, self.dtype, self.device)
                for _ in self.mtp.layers]

    def _positions(self, T: int, offset: int, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            return torch.arange(offset, offset + T, device=self.device)
        if positions.shape[-1] != T:
            raise InputError(f"positions cover {positions.shape[-1]} tokens but input_ids has {T}")
        return positions

    def hidden_states(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                      positions: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, hidden] (what lm_head and the MTP head consume).
        segments [B, T]: document ids of packed training rows (no cache): documents never see each other."""
        self._check_inputs(input_ids, cache)
        T = input_ids.shape[1]
        offset = cache.offset if cache is not None else 0
        pad = cache.pad if cache is not None else None
        masks = None
        if segments is not None:
            if cache is not None:
                raise InputError("segments (packed documents) are for training forwards without a cache")
            masks = SegmentMasks.build(segments, self.config.linear_conv_kernel_dim)
            positions = masks.positions if positions is None else positions
        elif pad is not None:
            masks = PaddingMasks.build(pad, offset, T)
            positions = masks.positions if positions is None else positions
        rope = self.rotary(self._positions(T, offset, positions))
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, None, masks, use_reentrant=False)
            else:
                x = layer(x, rope, None if cache is None else cache.layers[i], masks)
        if cache is not None:
            cache.offset += T
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.head_weight, out_fp32=True)

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                positions: torch.Tensor | None = None, logits_to_keep: int | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: LongTensor [B, T]. With a cache, continues from cache.offset and advances it.
        positions: optional [T], [B, T] or [3, B, T] (mRoPE) overriding offset-based positions.
        logits_to_keep: project only the last n positions. Returns fp32 logits [B, T or n, vocab]."""
        h = self.hidden_states(input_ids, cache, positions, segments)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        return self.logits(h)

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, caches: list[KVCache] | None = None,
                    positions: torch.Tensor | None = None, step: int = 0,
                    segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP draft step. hidden: target hidden states [B, T, H] at positions p; next_ids: the tokens
        at p+1 [B, T]; segments: document ids of the rows p (packed training).
        Returns (logits for p+2 [B, T, vocab] fp32, MTP hidden [B, T, H])."""
        if self.mtp is None:
            raise InputError("this checkpoint has no MTP head (no mtp.* tensors)")
        self._check_inputs(next_ids, None)
        T = next_ids.shape[1]
        offset = caches[0].length if caches else 0
        masks = None
        if segments is not None:
            masks = SegmentMasks.build(segments, self.config.linear_conv_kernel_dim)
            positions = masks.positions if positions is None else positions
        rope = self.rotary(self._positions(T, offset, positions))
        h = self.mtp(self.model.embed_tokens(next_ids), hidden.to(self.dtype), rope, caches, step, masks)
        return self.logits(h), h

    def _check_inputs(self, input_ids: torch.Tensor, cache: HybridCache | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise InputError(f"input_ids must be a LongTensor [batch, tokens], got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise InputError("input_ids is empty (0 tokens)")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if cache is not None and cache.batch_size != input_ids.shape[0]:
            raise InputError(f"cache was made for batch size {cache.batch_size} but input_ids has batch "
                             f"{input_ids.shape[0]}")
