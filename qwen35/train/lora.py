"""LoRA: low-rank adapters on chosen projections, trained while the base weights stay frozen, and merged
back into plain weights for a full checkpoint every tool can load.

y = x W^T + scale * (x A^T) B^T, A [r, in] (small random), B [out, r] (zeros, so training starts at the base
model), scale = alpha / r. Parameter names stay those of the base model (`...q_proj.weight`) plus
`...q_proj.lora_A` / `lora_B`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import Linear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj",
                   "up_proj", "down_proj")
# every projection an adapter can sit on (the DeltaNet's b/a gates and the MTP head's fc are off by default)
KNOWN_TARGETS = (*DEFAULT_TARGETS, "in_proj_b", "in_proj_a", "fc")


class LoRALinear(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        # the adapters keep their own dtype (fp32) on a base that computes in another (a bf16 quantized base);
        # under autocast the matmuls cast anyway, and an fp32 copy of x would only be saved for backward
        a = self.lora_A
        xa = x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
        return base + (F.linear(F.linear(xa, a), self.lora_B) * self.lora_scale).to(base.dtype)


def lora_scale(rank: int, alpha: float | None) -> float:
    """alpha / rank, alpha defaulting to 2 x rank: what adapters multiply their product by (and what a resume
    compares, train.run_state.check_same_lora)."""
    return (2 * rank if alpha is None else alpha) / rank


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
               seed: int = 0) -> list[str]:
    """Add adapters to every Linear named in `targets` and freeze everything else. Returns their names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):  # 0 would silently mean 2 x rank
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha}")
    gen = torch.Generator().manual_seed(seed)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.rsplit(".", 1)[-1] in targets:
            out_f, in_f = module.weight.shape
            module.__class__ = LoRALinear
            module.lora_A = nn.Parameter(torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f))
            module.lora_B = nn.Parameter(torch.zeros(out_f, rank))
            module.lora_scale = lora_scale(rank, alpha)
            names.append(name)
    if not names:
        raise ValueError(f"no projection matched the LoRA targets {targets}")
    # A loaded model reads projections that share an input (q|k|v, qkv|z|b|a, gate|up) as one fused matrix,
    # which would bypass LoRALinear.forward: a group holding an adapter runs its projections one by one
    # (owner.<attr> = None) until merge_lora folds the adapters in and restores the fused matrix.
    adapted = {id(module) for module in model.modules() if isinstance(module, LoRALinear)}
    unfused = []
    for owner, attr, linears in (model.fusion_groups() if hasattr(model, "fusion_groups") else []):
        fused = getattr(owner, attr)
        if fused is not None and any(id(layer) in adapted for layer in linears):
            setattr(owner, attr, None)
            unfused.append((owner, attr, fused))
    model.lora_unfused = unfused
    if hasattr(model, "_rebind"):  # kernels bound to the fused matrices must let go of them
        model._rebind()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    model.lora_active = True
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += scale * B A) and drop the adapters, in place. On a quantized
    base the adapted matrices become plain ones (train/qlora.py merge_quantized, which can also re-quantize)."""
    if getattr(model, "quant", None) is not None:
        from .qlora import merge_quantized

        return merge_quantized(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.weight += (module.lora_B @ module.lora_A * module.lora_scale).to(module.weight.dtype)
                del module.lora_A, module.lora_B
                module.__class__ = Linear
        # the merge wrote into the weights in place, so they are still views of their fused matrices
        for owner, attr, fused in getattr(model, "lora_unfused", ()):
            setattr(owner, attr, fused)
    model.lora_unfused = []
    if hasattr(model, "_rebind"):
        model._rebind()
    model.lora_active = False
    return model
