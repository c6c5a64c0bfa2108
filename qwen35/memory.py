"""Memory planning: what one sequence's state costs, and how much this machine can give it.

A sequence holds KV for its full-attention layers (bytes per token in the cache's format, kv_storage.py)
and a constant-size Gated DeltaNet state (fp32 recurrent state + conv window per linear-attention layer),
whatever its length. `qwen35 info` prints the plan for a context; the server admits requests by it
(engine.py): a request's prompt + max_tokens, reserved up front, must fit the memory budget beside the
requests already running, or it waits (or is refused when it could never fit).
"""

from __future__ import annotations

import argparse
import os
import re

# torch (via cache / kv_storage) is imported inside the functions: `qwen35 info` reads headers only and
# should not pay for importing it.


def memory_size(text: str) -> int:
    """An argparse type: '16GB', '16G', '16GiB', '512MB' or a byte count -> bytes (K/M/G/T: powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a size like 16GB or 512MB, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def memory_plan(config, context: int, kv_cache: str = "bf16") -> dict[str, float]:
    """Per-sequence state in bytes (a bf16 model): KV of the full-attention layers in format `kv_cache`
    (kv_storage.py) and the constant Gated DeltaNet state (fp32 recurrent state, bf16 conv state)."""
    import torch

    from .kv_storage import kv_bytes_per_token

    kv_per_token = len(config.full_attention_layers) * kv_bytes_per_token(
        kv_cache, config.num_key_value_heads, config.head_dim, torch.bfloat16)
    gdn = len(config.linear_attention_layers) * deltanet_state_bytes(
        config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim,
        config.linear_conv_kernel_dim, config.linear_conv_dim, 2)
    return {"kv_bytes_per_token": kv_per_token, "kv_bytes": kv_per_token * context, "deltanet_state_bytes": gdn}


def kv_capacity(tokens: int) -> int:
    """Tokens a KV buffer allocated for `tokens` holds (buffers come in KV_GROWTH_STEP units, cache.py)."""
    from .cache import KV_GROWTH_STEP

    return -(-max(tokens, 1) // KV_GROWTH_STEP) * KV_GROWTH_STEP


def sequence_bytes(layout, tokens: int) -> int:
    """Bytes of one row of a cache with this layout holding `tokens` tokens, reserved in one piece (as
    `HybridCache.reserve` allocates): KV at capacity plus the Gated DeltaNet state in the layout's dtype
    for the conv window and fp32 for the recurrent state."""
    import torch

    from .kv_storage import kv_bytes_per_token

    kv = layout.num_attention * kv_bytes_per_token(layout.kv_cache, layout.num_kv_heads, layout.head_dim,
                                                   layout.dtype) * kv_capacity(tokens)
    esize = torch.empty((), dtype=layout.dtype).element_size()
    state = layout.num_deltanet * deltanet_state_bytes(layout.num_v_heads, layout.key_dim, layout.value_dim,
                                                       layout.kernel_size, layout.conv_dim, esize)
    return kv + state


def deltanet_state_bytes(heads: int, key_dim: int, value_dim: int, kernel: int, conv_dim: int,
                         conv_esize: int) -> int:
    """One Gated DeltaNet layer's state for one sequence: the fp32 recurrent state [heads, Dk, Dv] and the
    conv window [kernel - 1, conv_dim] in the model's dtype (`conv_esize` bytes per value)."""
    return heads * key_dim * value_dim * 4 + (kernel - 1) * conv_dim * conv_esize


def available_bytes() -> int | None:
    """Memory the kernel says can be allocated without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # other Unixes: free physical pages (an underestimate: no page cache)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget(also_reserved: int = 0) -> int | None:
    """The server's default memory budget: 90% of what is available now (the model already loaded), less
    `also_reserved` (the prompt cache's cap, which fills only as prompts are reused) but never below half
    of it, so the requests in flight cannot push the machine into swap or the OOM killer while a large
    prompt cache cap on a small machine does not leave them nothing. None where the OS does not say."""
    avail = available_bytes()
    return None if avail is None else int(avail * 0.9) - min(also_reserved, int(avail * 0.4))
