"""One decoder layer: h = x + mixer(norm(x)); y = h + mlp(norm(h)). The mixer is chosen by the layer type.

Both mixers (GatedDeltaNet, GatedAttention) take the same arguments, `(x, state, ctx)`: the hidden states,
the layer's own cache entry (DeltaNetState or KVCache view, or None) and the LayerContext. The MTP head
reuses this layer, which is why it lives in its own module (no cycle between model/qwen35.py and mtp.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import GatedAttention
from .deltanet import GatedDeltaNet
from .masks import LayerContext
from .mlp import MLP
from .norm import RMSNorm


class DecoderLayer(nn.Module):
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

    @property
    def mixer(self) -> GatedDeltaNet | GatedAttention:
        return self.linear_attn if self.layer_type == "linear_attention" else self.self_attn

    def forward(self, x: torch.Tensor, state, ctx: LayerContext) -> torch.Tensor:
        x = x + self.mixer(self.input_layernorm(x), state, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))
