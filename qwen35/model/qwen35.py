"""Qwen3.5 text model: embedding -> decoder layers (Gated DeltaNet or gated attention) -> norm -> head.

Module and parameter names follow the HF checkpoint (`model.embed_tokens`, `model.layers.{i}.linear_attn.*`,
`model.layers.{i}.self_attn.*`, `model.norm`, `lm_head`, `mtp.*`), so loading is a short name mapping and
a state dict round-trips. State lives in a caller-owned HybridCache (`make_cache`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..cache import CacheLayout, HybridCache
from ..config import ModelConfig
from ..errors import Qwen35Error
from ..ops.linear import Embedding, Linear, fuse_linears, linear, unfuse_linears
from ..runtime import denormals_flushed
from .decoder import DecoderLayer
from .masks import LayerContext, SegmentMasks
from .mtp import MTPHead
from .norm import RMSNorm
from .rope import RotaryEmbedding


class InputError(Qwen35Error, ValueError):
    """A forward call got inputs it cannot process (wrong shape, dtype, token id or cache)."""


@contextlib.contextmanager
def _holding(cache: HybridCache | None):
    """Layers are writing `cache`: an exception (Ctrl-C included) that stops them part-way leaves some layers
    holding the new tokens' state and the rows' lengths not, so the cache is marked and refused until a
    restore (HybridCache.check_usable); copying its state before each forward would cost decode its in-place
    update."""
    try:
        yield
    except BaseException as e:
        if cache is not None:
            cache.mark_interrupted(type(e).__name__)
        raise


def keeps_fp32(name: str) -> bool:
    """Parameters kept in fp32 whatever the model dtype (A_log, dt_bias, norm weights: a few KB)."""
    return name.endswith(("A_log", "dt_bias")) or ("norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"))


class TextModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
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
        self.visual = None  # the vision tower (model/vision.py), set by the loader outside the module tree
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False  # training: recompute each layer's activations in backward
        self.head_runtime = None  # a weight object for the vocabulary projection, bound by ops/fast
        self.decode_stack = None  # every layer's decode step in one call (ops/decode_stack.py), bound by ops/fast
        self.kernels: bool | None = None  # what ops/fast.bind_kernels last bound (None: never bound)
        self.quant: str | None = None  # the quantization policy its weights were loaded with
        self.kv_cache = "bf16"  # the KV format make_cache uses by default (kv_storage.py; load_model sets it)

    def fusion_groups(self) -> list[tuple[nn.Module, str, list[nn.Linear]]]:
        """Projections that share an input, per layer: (owner, attribute for the fused matrix, linears)."""
        groups = []
        for layer in [*self.model.layers, *(self.mtp.layers if self.mtp is not None else [])]:
            mixer = layer.linear_attn if layer.layer_type == "linear_attention" else layer.self_attn
            groups.append(mixer.fusion_group())
            groups.append(layer.mlp.fusion_group())
        return groups

    def fuse_projections(self, owners=None) -> None:
        """Concatenate projections that share an input (q|k|v, qkv|z|b|a, gate|up) so each is one weight
        stream (the groups whose owner is in `owners`, default all); parameters become views of the fused
        matrices, names and values unchanged. (The loader reads checkpoints straight into fused storage
        instead.) Kernel bindings are renewed."""
        for owner, attr, linears in self.fusion_groups():
            if getattr(owner, attr) is None and (owners is None or owner in owners):
                setattr(owner, attr, fuse_linears(*linears))
        self._rebind()

    def unfuse_projections(self, owners=None) -> None:
        """Each projection (of the groups whose owner is in `owners`, default all) gets its own weight and
        runs alone again: what training and LoRA need. Kernel bindings are renewed."""
        for owner, attr, linears in self.fusion_groups():
            if getattr(owner, attr) is not None and (owners is None or owner in owners):
                unfuse_linears(*linears)
                setattr(owner, attr, None)
        self._rebind()

    def named_weights(self):
        """(name, weight) for every parameter and every weight object standing in for one (a quantized matrix
        is a QuantizedWeight, not a parameter), each once: fused matrices are views of these, not extra."""
        yield from self.named_parameters()
        for mod_name, m in self.named_modules():
            w = m.__dict__.get("weight")
            if w is not None and not isinstance(w, torch.Tensor):
                yield f"{mod_name}.weight", w

    @property
    def fused(self) -> bool:
        return any(getattr(owner, attr) is not None for owner, attr, _ in self.fusion_groups())

    def _rebind(self) -> None:
        if self.kernels is not None:
            from ..ops.fast import bind_kernels

            bind_kernels(self, self.kernels)

    def _apply(self, fn, recurse=True):
        # .to(), .float(), .half(): each parameter gets a new tensor, which would leave the fused matrices
        # (and any kernel bound to them) reading the old weights. Unfuse first, fuse again after. The fp32
        # parameters (keeps_fp32) stay fp32 through a dtype change.
        if self.quant is not None:
            raise Qwen35Error(f"this model holds {self.quant} quantized weights, which .to() / .float() cannot "
                              "convert; load it again with the dtype you want")
        fused = {owner for owner, attr, _ in self.fusion_groups() if getattr(owner, attr) is not None}
        kernels, self.kernels = self.kernels, None  # rebinding waits until the weights have moved
        if kernels is not None:
            from ..ops.fast import unbind_kernels

            unbind_kernels(self)
        self.unfuse_projections(fused)
        fp32 = {n: p.data for n, p in self.named_parameters() if keeps_fp32(n) and p.dtype == torch.float32}
        out = super()._apply(fn, recurse)
        for n, p in self.named_parameters():  # a dtype change leaves these in fp32, as the loader does
            if n in fp32 and p.dtype != torch.float32 and p.dtype.is_floating_point:
                p.data = fp32[n].to(p.device)
        self.fuse_projections(fused)  # only the groups that were fused: LoRA's unfused ones stay apart
        self.kernels = kernels
        self._rebind()
        return out

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

    def cache_layout(self, mtp: bool = False, kv_cache: str | None = None) -> CacheLayout:
        """kv_cache: "bf16" or "q8_0" (kv_storage.py); default the model's `kv_cache` (set by load_model)."""
        c = self.config
        types = ["full_attention"] * len(self.mtp.layers) if mtp else c.layer_types
        return CacheLayout(types, c.num_key_value_heads, c.head_dim, c.linear_conv_dim, c.linear_conv_kernel_dim,
                           c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim, self.dtype,
                           self.device, kv_cache or self.kv_cache, c.max_position_embeddings)

    def make_cache(self, batch_size: int = 1, kv_cache: str | None = None) -> HybridCache:
        """Empty state for `batch_size` sequences, one entry per decoder layer. kv_cache: how the attention
        layers store keys and values, "bf16" (the model's dtype) or "q8_0"; default `self.kv_cache`, which
        `load_model(..., kv_cache=)` sets, so every cache the library makes for this model (generation, the
        server's rows, prompt caches, speculative decoding) uses it."""
        return HybridCache.empty(self.cache_layout(kv_cache=kv_cache), batch_size)

    def make_mtp_cache(self, batch_size: int = 1, kv_cache: str | None = None) -> HybridCache:
        """State (KV) for the MTP head's own attention layers (in the model's KV format by default)."""
        if self.mtp is None:
            raise InputError("this checkpoint has no MTP head (no mtp.* tensors)")
        return HybridCache.empty(self.cache_layout(mtp=True, kv_cache=kv_cache), batch_size)

    def _positions(self, T: int, cache: HybridCache | None, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            return torch.arange(T, device=self.device) if cache is None else cache.positions(T)
        if positions.shape[-1] != T:
            raise InputError(f"positions cover {positions.shape[-1]} tokens but input_ids has {T}")
        return positions

    def hidden_states(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                      positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, hidden] (what lm_head and the MTP head consume).
        segments [B, T]: document ids of packed training rows (no cache): documents never see each other.
        inputs_embeds [B, T, hidden]: the input embeddings to use instead of looking up input_ids (image
        features scattered in, multimodal.py); input_ids still give the shape and are checked."""
        self._check_inputs(input_ids, cache)
        T = input_ids.shape[1]
        masks = None
        if segments is not None:
            if cache is not None:
                raise InputError("segments (packed documents) are for training forwards without a cache")
            masks = SegmentMasks.build(segments, self.config.linear_conv_kernel_dim)
            positions = masks.positions if positions is None else positions
        ctx = LayerContext(self.rotary(self._positions(T, cache, positions)), masks)
        if inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
            raise InputError(f"inputs_embeds {list(inputs_embeds.shape)} do not match input_ids {list(input_ids.shape)}")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.to(self.dtype)
        # runtime.py: the decays' denormals cost a microcode assist per op
        with denormals_flushed(T > 4), _holding(cache):
            stacked = None if self.decode_stack is None or cache is None else self.decode_stack(x, cache, ctx)
            if stacked is not None:
                x = stacked
            else:
                for i, layer in enumerate(self.model.layers):
                    if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                        x = torch.utils.checkpoint.checkpoint(layer, x, None, ctx, use_reentrant=False)
                    else:
                        x = layer(x, None if cache is None else cache.layers[i], ctx)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def prefill_by_layer(self, input_ids: torch.Tensor, cache: HybridCache, chunk: int, run=None) -> torch.Tensor:
        """What `hidden_states(input_ids[:, s:s+chunk])` for s = 0, chunk, ... computes, bit for bit, but layer
        by layer: each layer takes every chunk in turn before the next layer starts. A layer's quantized
        weights are then dequantized once per call instead of once per chunk (quant/weight.dequantized_once),
        while every chunk still runs alone through the layer (the same bounded activation memory, plus the
        hidden states of all of input_ids: generation.prefill passes groups of 16 chunks). Attention
        KV and Gated DeltaNet state fill in the same order as chunk by chunk; each row's length (the position
        counter the layers write at) is set to the chunk's start while a layer runs it. run(fn, work): how each
        layer's pass is called (generation.prefill: the thread governor, timing it as work = T / layers tokens,
        so a probe of the other thread count costs one layer of the prompt, not all of it). Returns the final
        normed hidden states of the last chunk [B, T_last, hidden]."""
        from ..ops.fast import weight_objects
        from ..quant.weight import dequantized_once

        self._check_inputs(input_ids, cache)
        # what the reused matrices may hold: the largest layer's quantized matrices dequantized to bf16 (its
        # 2-D weights counted in full, the bf16 rows a stacked projection copies among them), so every layer
        # keeps all of its own: 41 MiB on the 0.8B, 416 MiB on the 9B (a tenth of its int4 bytes)
        budget = max(sum(2 * w.shape.numel() for m in layer.modules() for w in weight_objects(m))
                     + sum(2 * p.numel() for p in layer.parameters() if p.dim() == 2)
                     for layer in self.model.layers)
        T = input_ids.shape[1]
        spans = [(s, min(T, s + chunk)) for s in range(0, T, chunk)]
        positions = cache.positions(T)
        ctxs = [LayerContext(self.rotary(positions[:, s:e])) for s, e in spans]
        base = cache.lengths
        xs = [self.model.embed_tokens(input_ids[:, s:e]) for s, e in spans]

        def one_layer(i: int, layer) -> None:
            with dequantized_once(budget):
                for c, (s, e) in enumerate(spans):
                    for row, b in zip(cache.rows, base):
                        row.length = b + s
                    with denormals_flushed(e - s > 4):  # per chunk, as hidden_states would
                        xs[c] = layer(xs[c], cache.layers[i], ctxs[c])

        run = run or (lambda fn, work: fn())
        try:
            with _holding(cache):
                for i, layer in enumerate(self.model.layers):
                    run(lambda i=i, layer=layer: one_layer(i, layer), T / len(self.model.layers))
        finally:
            for row, b in zip(cache.rows, base):
                row.length = b
        cache.advance(T)
        return self.model.norm(xs[-1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., vocab] of hidden states [..., hidden]."""
        w = self.head_weight if self.head_runtime is None or torch.is_grad_enabled() else self.head_runtime
        return linear(hidden, w, out_fp32=True)

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                positions: torch.Tensor | None = None, logits_to_keep: int | None = None,
                segments: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: LongTensor [B, T]. With a cache, continues from cache.offset and advances it.
        positions: optional [T], [B, T] or [3, B, T] (mRoPE) overriding offset-based positions.
        logits_to_keep: project only the last n positions. Returns fp32 logits [B, T or n, vocab].
        inputs_embeds: as in hidden_states."""
        if logits_to_keep is not None and not (isinstance(logits_to_keep, int) and logits_to_keep >= 1):
            raise InputError(f"logits_to_keep must be an integer >= 1 (None: every position), got {logits_to_keep!r}")
        h = self.hidden_states(input_ids, cache, positions, segments, inputs_embeds)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        return self.logits(h)

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: HybridCache | None = None,
                    positions: torch.Tensor | None = None, step: int = 0,
                    segments: torch.Tensor | None = None, logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One MTP draft step. hidden: target hidden states [B, T, H] at positions p; next_ids: the tokens
        at p+1 [B, T]; cache: from `make_mtp_cache` (advanced by T); segments: document ids of the rows p
        (packed training). Returns (logits for p+2 [B, T, vocab] fp32, or None with logits=False (speculative
        decoding projects the drafts itself, over a reduced vocabulary), MTP hidden [B, T, H])."""
        h = self.mtp_hidden(hidden, next_ids, cache, positions, step, segments)
        return (self.logits(h) if logits else None), h

    def mtp_hidden(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: HybridCache | None = None,
                   positions: torch.Tensor | None = None, step: int = 0,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
        """The MTP head's hidden states [B, T, H] (mtp_forward without the vocabulary projection: training
        projects them in chunks)."""
        if self.mtp is None:
            raise InputError("this checkpoint has no MTP head (no mtp.* tensors)")
        self._check_inputs(next_ids, cache)
        T = next_ids.shape[1]
        masks = None
        if segments is not None:
            masks = SegmentMasks.build(segments, self.config.linear_conv_kernel_dim)
            positions = masks.positions if positions is None else positions
        ctx = LayerContext(self.rotary(self._positions(T, cache, positions)), masks)
        with denormals_flushed(T > 4), _holding(cache):
            h = self.mtp(self.model.embed_tokens(next_ids), hidden.to(self.dtype), ctx, cache, step)
        if cache is not None:
            cache.advance(T)
        return h

    def _check_inputs(self, input_ids: torch.Tensor, cache: HybridCache | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise InputError(f"input_ids must be a LongTensor [batch, tokens], got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise InputError("input_ids is empty (0 tokens)")
        if input_ids.numel() <= 64:  # a decode step: two small ops cost ~90 us a token with the caches flushed
            ids = input_ids.flatten().tolist()
            lo, hi = min(ids), max(ids)
        else:
            lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if cache is not None:
            cache.check_usable()
        if cache is not None and cache.batch_size != input_ids.shape[0]:
            raise InputError(f"cache was made for batch size {cache.batch_size} but input_ids has batch "
                             f"{input_ids.shape[0]}")
