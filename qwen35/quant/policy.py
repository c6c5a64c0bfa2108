"""Which tensor gets which bits: the quantization policies, by name.

A policy maps each parameter to a layout (formats.LAYOUTS) or None (kept in the checkpoint's precision).
Never quantized, whatever the policy: A_log, dt_bias and every norm (fp32, a few KB, and the Gated DeltaNet
decay path is where error compounds along the sequence), the conv1d weights (4 taps per channel), and any
matrix whose input dimension is not a multiple of the block. The names `--quant` accepts:

- `q8_0`, `q4_0`, `q4_k`, `q6_k`: every other matrix in that layout (embedding only when it is tied to the
  head, since the lookup reads a handful of rows and only the head streams it); a matrix whose K is not a
  multiple of a K-quant's super-block of 256 gets the 32-block layout of at least its bits instead
  (q4_k -> q4_0, q6_k -> q8_0);
- `int8`: the recommended 8-bit policy, which is q8_0;
- `int4`: the recommended 4-bit policy, GGUF's K-quants: q4_k for the MLP and attention projections; q6_k
  for the vocabulary projection (the most sensitive class: alone in 4 bits it costs more KL than all the
  rest together) and, on the layers llama.cpp's Q4_K_M gives more bits (`more_bits`: the first and last
  eighth and every third layer between), for the Gated DeltaNet projections in_proj_qkv, in_proj_z and
  out_proj (the next most sensitive, per bit spent), plus every attention v_proj; q8_0 for the small Gated
  DeltaNet gate projections in_proj_a / in_proj_b. On the bundled model it measures a lower KL than
  llama.cpp's Q4_K_M at fewer bits per weight (README; benchmarks/bench_quant.py).
"""

from __future__ import annotations

from ..model.qwen35 import keeps_fp32
from .formats import BLOCK, LAYOUTS, QuantError

POLICIES = ("int8", "int4", *LAYOUTS)
FALLBACK = {"q4_k": "q4_0", "q6_k": "q8_0"}  # for a K that is not a multiple of the super-block
SENSITIVE = ("linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight", "linear_attn.out_proj.weight")


def _kept(name: str) -> bool:
    return (name.endswith(("A_log", "dt_bias", "conv1d.weight")) or "norm" in name.rsplit(".", 2)[-2]
            or not name.endswith("weight"))


def is_head(name: str) -> bool:
    return name in ("lm_head.weight", "model.embed_tokens.weight")


def fitted(scheme: str | None, K: int) -> str | None:
    """`scheme`, or its fallback where K does not fit its blocks (None: nothing fits, keep the matrix)."""
    while scheme is not None and not LAYOUTS[scheme].fits(K):
        scheme = FALLBACK.get(scheme)
    return scheme


def more_bits(layer: int, num_layers: int) -> bool:
    """The decoder layers whose sensitive projections get 6 bits under int4 (llama.cpp's Q4_K_M rule): the
    first and last eighth of the stack, and every third layer between; never a layer outside the stack."""
    e = num_layers // 8
    return 0 <= layer < num_layers and (layer < e or layer >= 7 * num_layers // 8 or (layer - e) % 3 == 2)


def _layer(name: str) -> int:
    """The decoder layer a parameter belongs to; -1 outside the decoder stack (the MTP head's layers)."""
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else -1


def num_layers_of(shapes) -> int:
    return 1 + max((_layer(n) for n in shapes), default=-1)


def scheme_for(policy: str, name: str, shape: tuple[int, ...], tied: bool, num_layers: int = 0) -> str | None:
    """The layout parameter `name` of `shape` gets under `policy`, or None to keep it. num_layers: the decoder
    depth (int4 picks its 6-bit layers by position in it; plan() counts it from the parameter names)."""
    if policy not in POLICIES:
        raise QuantError(f"unknown quantization {policy!r}: use one of {', '.join(POLICIES)}")
    if _kept(name) or len(shape) != 2 or shape[1] % BLOCK:
        return None
    return fitted(_choose(policy, name, tied, num_layers), shape[1])


def _choose(policy: str, name: str, tied: bool, num_layers: int) -> str | None:
    if name == "model.embed_tokens.weight" and not tied:
        return None
    if policy in LAYOUTS:
        return policy
    if policy == "int8":
        return "q8_0"
    if name.endswith(("in_proj_a.weight", "in_proj_b.weight")):
        return "q8_0"
    if is_head(name) or name.endswith("self_attn.v_proj.weight"):
        return "q6_k"
    if name.endswith(SENSITIVE) and more_bits(_layer(name), num_layers):
        return "q6_k"
    return "q4_k"


def plan(policy, shapes: dict[str, tuple[int, ...]], tied: bool) -> dict[str, str]:
    """{parameter name: layout} for every parameter `policy` quantizes. policy: a name from POLICIES, or a
    function (name, shape, tied) -> layout | None (measurements of one tensor class at a time); the
    never-quantized tensors stay kept either way."""
    out = {}
    depth = num_layers_of(shapes)
    for name, shape in shapes.items():
        if callable(policy):
            s = None if _kept(name) or len(shape) != 2 or shape[1] % BLOCK else fitted(policy(name, tuple(shape), tied), shape[1])
        else:
            s = scheme_for(policy, name, tuple(shape), tied, depth)
        if s is not None:
            out[name] = s
    return out


def bits_per_weight(plan_: dict[str, str], shapes: dict[str, tuple[int, ...]], dtype_bits: int = 16) -> float:
    """Average bits per weight over every parameter (head and embedding included, each counted once)."""
    total = bits = 0.0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        total += n
        bits += n * (LAYOUTS[plan_[name]].bits_per_weight if name in plan_ else (32 if keeps_fp32(name) else dtype_bits))
    return bits / max(total, 1)

