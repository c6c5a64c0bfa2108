"""When the fused C++ kernels may replace a reference torch path.

Inference only (no autograd), CPU tensors in bf16 or fp32, kernels built, and not switched off with
`set_fast_kernels(False)` (tests use that to run the reference beside the fast path).
"""

from __future__ import annotations

import torch

from . import kernels

_enabled = True


def set_fast_kernels(enabled: bool) -> None:
    """Switch every fast path on or off (the reference path stays correct either way)."""
    global _enabled
    _enabled = enabled


def fast_kernels_enabled() -> bool:
    return _enabled


def fast_path_ok(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)) -> bool:
    return (_enabled and x.dtype in dtypes and x.device.type == "cpu" and not torch.is_grad_enabled()
            and kernels.available())
