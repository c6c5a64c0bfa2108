"""The multi-token-prediction (MTP) head shipped with Qwen3.5 checkpoints (`mtp.*`).

One draft step: e = RMSNorm_e(embed(token_{t+1})), h = RMSNorm_h(hidden_t) (the target model's final,
normed hidden state), x = fc([e | h]) (embedding first), one full-attention decoder layer with its own
KV cache, then `mtp.norm`. The shared lm_head turns the result into logits for token t+2. It will drive
speculative decoding; here it loads and runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..ops.linear import Linear
from .decoder import DecoderLayer
from .masks import LayerContext
from .norm import RMSNorm


class MTPHead(nn.Module):
    def __init__(self, config: ModelConfig, num_layers: int):
        super().__init__()
        H = config.hidden_size
        self.fc = Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(H, config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(H, config.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(config, "full_attention") for _ in range(num_layers))
        self.norm = RMSNorm(H, config.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, ctx: LayerContext, cache=None,
                step: int = 0) -> torch.Tensor:
        """embeds: embeddings of the next tokens [B, T, H]; hidden: target hidden states [B, T, H] at the
        same rows; cache: the MTP HybridCache or None (its rows advance with every call, so a checkpoint with
        several MTP layers used on alternate steps would need one cache per layer; Qwen3.5 ships one).
        Returns the normed MTP hidden [B, T, H]."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        i = step % len(self.layers)
        x = self.layers[i](x, None if cache is None else cache.layers[i], ctx)
        return self.norm(x)
