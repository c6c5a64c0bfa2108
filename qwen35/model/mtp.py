"""The multi-token-prediction (MTP) head shipped with Qwen3.5 checkpoints (`mtp.*`).

One draft step: e = RMSNorm_e(embed(token_{t+1})), h = RMSNorm_h(hidden_t) (the target model's final,
normed hidden state), x = fc([e | h]) (embedding first), one full-attention decoder layer with its own
KV cache, then `mtp.norm`. The shared lm_head turns the result into logits for token t+2. It will drive
speculative decoding; here it loads and runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import Linear

from ..config import ModelConfig
from .norm import RMSNorm


class MTPHead(nn.Module):
    def __init__(self, config: ModelConfig, num_layers: int):
        super().__init__()
        from .qwen35 import DecoderLayer  # the MTP layer is an ordinary full-attention decoder layer

        H = config.hidden_size
        self.fc = Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(H, config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(H, config.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(config, "full_attention") for _ in range(num_layers))
        self.norm = RMSNorm(H, config.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, rope, caches=None, step: int = 0,
                masks=None) -> torch.Tensor:
        """embeds: embeddings of the next tokens [B, T, H]; hidden: target hidden states [B, T, H] at the
        same rows; caches: one KVCache per MTP layer or None; masks: SegmentMasks of packed training rows.
        Returns the normed MTP hidden [B, T, H]."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        i = step % len(self.layers)
        x = self.layers[i](x, rope, None if caches is None else caches[i], masks)
        return self.norm(x)
