"""The one table between our parameter names and llama.cpp's `qwen35` tensor names, and the layout
transforms llama.cpp applies on the way, each with its exact inverse. Both the reader and the writer use it.

What llama.cpp's converter changes (read from its `conversion/qwen.py`; re-derived here, not copied):
- zero-centred norms store w + 1 (every RMSNorm except the Gated DeltaNet output norm `ssm_norm`);
- `ssm_a` = -exp(A_log); `ssm_dt.bias` is dt_bias;
- conv1d [C, 1, K] is squeezed to [C, K];
- when Hv != Hk, value heads go from grouped-by-key-head order [k0: v0..v(r-1), k1: ...] to tiled order
  [v0: k0..k(Hk-1), v1: ...] in every tensor indexed by value head: the v rows of qkv, z, a, b, A_log,
  dt_bias, the v channels of conv1d, and the columns of out_proj;
- the MTP head becomes layer `num_hidden_layers` (fc -> nextn.eh_proj, its norms -> nextn.*), its decoder
  layers the layers after it.
Shapes below are torch order ([rows, cols]); GGUF lists the same dims reversed.
"""

from __future__ import annotations

import re

import torch

from ..config import ModelConfig

GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {  # after "layers.{i}." -> after "blk.{i}."
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
    "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
MTP_HEAD = {  # under "blk.{num_hidden_layers}."
    "mtp.fc.weight": "nextn.eh_proj.weight",
    "mtp.pre_fc_norm_embedding.weight": "nextn.enorm.weight",
    "mtp.pre_fc_norm_hidden.weight": "nextn.hnorm.weight",
    "mtp.norm.weight": "nextn.shared_head_norm.weight",
}
_LAYER_BACK = {v: k for k, v in LAYER.items()}
_MTP_BACK = {v: k for k, v in MTP_HEAD.items()}
_GLOBAL_BACK = {v: k for k, v in GLOBAL.items()}


def gguf_name(name: str, num_layers: int) -> str:
    """Our parameter name -> llama.cpp's tensor name (num_layers: the main model's decoder layers)."""
    if name in GLOBAL:
        return GLOBAL[name]
    if name in MTP_HEAD:
        return f"blk.{num_layers}.{MTP_HEAD[name]}"
    m = re.fullmatch(r"(model|mtp)\.layers\.(\d+)\.(.+)", name)
    if m is None or m.group(3) not in LAYER:
        raise KeyError(f"no llama.cpp name for parameter '{name}'")
    i = int(m.group(2)) + (num_layers if m.group(1) == "mtp" else 0)
    return f"blk.{i}.{LAYER[m.group(3)]}"


def our_name(gguf: str, num_layers: int) -> str | None:
    """llama.cpp's tensor name -> our parameter name; None when the name is not one of qwen35's."""
    if gguf in _GLOBAL_BACK:
        return _GLOBAL_BACK[gguf]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf)
    if m is None:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i >= num_layers and rest in _MTP_BACK:
        return _MTP_BACK[rest] if i == num_layers else None
    if rest not in _LAYER_BACK:
        return None
    if i < num_layers:
        return f"model.layers.{i}.{_LAYER_BACK[rest]}"
    return f"mtp.layers.{i - num_layers}.{_LAYER_BACK[rest]}"


def is_centred_norm(name: str) -> bool:
    """Norm weights used as (1 + w): every RMSNorm but the Gated DeltaNet output norm."""
    module = name.rsplit(".", 2)[-2]
    return name.endswith("weight") and "norm" in module and not name.endswith("linear_attn.norm.weight")


# ---- value-head order ----
def _tiled(num_k: int, num_v: int, head_dim: int) -> torch.Tensor:
    """Index p with tiled[j] = grouped[p[j]] over num_v * head_dim entries."""
    r = num_v // num_k
    return torch.arange(num_v * head_dim).reshape(num_k, r, head_dim).transpose(0, 1).reshape(-1)


def row_index(name: str, config: ModelConfig) -> torch.Tensor | None:
    """Rows of llama.cpp's tensor as rows of ours (gguf = ours[index]), None when the order is the same."""
    Hk, Hv = config.linear_num_key_heads, config.linear_num_value_heads
    if Hk == Hv or ".linear_attn." not in name:
        return None
    Dv = config.linear_value_head_dim
    if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
        qk = 2 * config.linear_key_dim
        return torch.cat([torch.arange(qk), qk + _tiled(Hk, Hv, Dv)])
    if name.endswith("in_proj_z.weight"):
        return _tiled(Hk, Hv, Dv)
    if name.endswith(("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias")):
        return _tiled(Hk, Hv, 1)
    return None


def col_index(name: str, config: ModelConfig) -> torch.Tensor | None:
    """Columns of llama.cpp's tensor as columns of ours, None when the order is the same."""
    Hk, Hv = config.linear_num_key_heads, config.linear_num_value_heads
    if Hk != Hv and name.endswith("linear_attn.out_proj.weight"):
        return _tiled(Hk, Hv, config.linear_value_head_dim)
    return None


def inverse(index: torch.Tensor) -> torch.Tensor:
    return torch.argsort(index)


# ---- values ----
def to_gguf(name: str, t: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Our tensor -> llama.cpp's (values and layout; dtype kept, except fp32 math for A_log and norms)."""
    if name.endswith("A_log"):
        t = -torch.exp(t.float())
    elif is_centred_norm(name):
        t = t.float() + 1
    elif name.endswith("conv1d.weight"):
        t = t.reshape(t.shape[0], t.shape[-1])
    rows, cols = row_index(name, config), col_index(name, config)
    if rows is not None:
        t = t[rows]
    if cols is not None:
        t = t[:, cols]
    return t.contiguous()


def from_gguf(name: str, t: torch.Tensor, config: ModelConfig, shape: tuple[int, ...]) -> torch.Tensor:
    """llama.cpp's tensor (torch order) -> ours, of `shape`; the exact inverse of `to_gguf`."""
    rows, cols = row_index(name, config), col_index(name, config)
    if rows is not None:
        t = t[inverse(rows)]
    if cols is not None:
        t = t[:, inverse(cols)]
    if name.endswith("A_log"):
        a = -t.float()
        t = preimage(torch.exp, a, torch.log(a))
    elif is_centred_norm(name):
        w = t.float()
        t = preimage(lambda x: 1.0 + x, w, w - 1)
    return t.reshape(shape)


def preimage(fn, target: torch.Tensor, x: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """x nudged by ulps until fn(x) == target exactly in fp32 (where an fp32 x exists, as it does for a value
    the exporter computed as fn(ours)): so the model's -exp(A_log) and 1 + w reproduce llama.cpp's stored
    ssm_a and norm weights bit for bit, where log(a) or w - 1 alone can be an ulp off."""
    up, down = torch.full_like(x, float("inf")), torch.full_like(x, -float("inf"))
    for _ in range(steps):
        y = fn(x)
        if torch.equal(y, target):
            break
        x = torch.where(y < target, torch.nextafter(x, up), torch.where(y > target, torch.nextafter(x, down), x))
    return x
