"""The export-friendly forward of a Qwen3.5 text model: every piece of state is an explicit tensor.

`GraphModel(model, decode)` wraps a loaded `Qwen35ForCausalLM` (fp32, reference ops, no fused weights) and
runs `forward(input_ids, *past) -> (logits of the last position, *present)`, where `past` / `present` are,
layer by layer in order (`cache_spec`):
  Gated DeltaNet layer i: conv [B, K-1, conv_dim] (the last K-1 pre-convolution inputs) and
                          recurrent [B, Hv, Dk, Dv] (fp32), exactly qwen35's DeltaNetState;
  gated attention layer i: key, value [B, Hkv, P, D] (P tokens seen so far, RoPE already applied).
Positions are P + arange(T), P read from the first attention layer's key length (text only: no mRoPE).

The gated delta rule is one custom op, `qwen35_onnx::gated_delta`, which runs qwen35's own reference
(chunked for prompts) in torch and becomes onnxruntime's contrib operator `com.microsoft.LinearAttention`
(update_rule gated_delta) in the graph. That operator is a native kernel in onnxruntime's CPU provider and in
onnxruntime-web's WASM build (1.31), where `com.microsoft.GatedDeltaNet` has no WASM kernel; prompts then run
without any per-token loop in the graph (no ONNX `Scan`, which peers measured 10-50x slower). Everything
else is plain ONNX (the causal conv as K shifted multiply-adds, attention as MatMul/Softmax) so the graph
runs on any provider that has the one contrib op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.rope import rope_inv_freq
from ..ops.gated_delta import gated_delta_rule

MS_DOMAIN = "com.microsoft"


@torch.library.custom_op("qwen35_onnx::gated_delta", mutates_args=())
def gated_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, g: torch.Tensor,
                beta: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule on LinearAttention's packed layout: q, k [B, T, H*Dk] (not yet scaled), v
    [B, T, H*Dv], state [B, H, Dk, Dv], g, beta [B, T, H]. Returns (o [B, T, H*Dv], new state)."""
    B, T, _ = q.shape
    q4, k4, v4 = (x.reshape(B, T, heads, -1) for x in (q, k, v))
    o, s = gated_delta_rule(q4 * scale, k4, v4, g, beta, state)
    return o.reshape(B, T, -1).contiguous(), s.contiguous()


@gated_delta.register_fake
def _(q, k, v, state, g, beta, heads, scale):
    return v.new_empty(v.shape), state.new_empty(state.shape)


def gated_delta_onnx(q, k, v, state, g, beta, heads: int, scale: float):
    """onnxscript translation of `gated_delta` (used by torch.onnx.export's custom_translation_table)."""
    from onnxscript.values import Opset

    _register_linear_attention_schema()
    return Opset(MS_DOMAIN, 1).LinearAttention(q, k, v, state, g, beta, q_num_heads=heads, kv_num_heads=heads,
                                               scale=scale, update_rule="gated_delta", _outputs=2)


def _register_linear_attention_schema() -> None:
    """onnx's Python schema registry knows no contrib ops, and onnxscript emits only ops it has a schema for:
    declare com.microsoft.LinearAttention's signature (as onnxruntime documents it) once."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(("LinearAttention"), MS_DOMAIN):
        return
    T = OpSchema.FormalParameter
    fl = ["tensor(float)", "tensor(float16)"]
    schema = OpSchema(
        "LinearAttention", MS_DOMAIN, 1,
        inputs=[T("query", "T"), T("key", "T"), T("value", "T"), T("past_state", "T"), T("decay", "T"),
                T("beta", "T")],
        outputs=[T("output", "T"), T("present_state", "T")],
        type_constraints=[("T", fl, "float tensors")],
        attributes=[OpSchema.Attribute("q_num_heads", OpSchema.AttrType.INT, "query heads"),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "output scale"),
                    OpSchema.Attribute("update_rule", OpSchema.AttrType.STRING, "recurrence")])
    onnx.defs.register_schema(schema)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 1.0) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * (offset + w): offset 1 for the zero-centred norms, 0 for the gated one."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)


def cache_spec(config) -> list[tuple[str, str, tuple]]:
    """(name, kind, shape) of each cache tensor in graph order; shape entries are ints or the symbolic
    'batch' / 'past' (tokens already processed)."""
    c, spec = config, []
    for i, t in enumerate(c.layer_types):
        if t == "linear_attention":
            spec.append((f"{i}.conv", "conv", ("batch", c.linear_conv_kernel_dim - 1, c.linear_conv_dim)))
            spec.append((f"{i}.recurrent", "recurrent", ("batch", c.linear_num_value_heads,
                                                         c.linear_key_head_dim, c.linear_value_head_dim)))
        else:
            for kind in ("key", "value"):
                spec.append((f"{i}.{kind}", kind, ("batch", c.num_key_value_heads, "past", c.head_dim)))
    return spec


class GraphModel(nn.Module):
    """forward(input_ids [B, T] int64, *past) -> (logits [B, vocab] fp32 of the last position, *present).
    decode=True: the one-token graph (T = 1: no causal mask to build). head_matmul=True: the vocabulary
    projection as a MatMul on its own [hidden, vocab] copy (what weight quantizers rewrite) instead of a Gemm
    that reads the tied embedding table in place."""

    def __init__(self, model, decode: bool = False, head_matmul: bool = False):
        super().__init__()
        self.model, self.config, self.decode, self.head_matmul = model, model.config, decode, head_matmul
        inv_freq, self.rope_scale = rope_inv_freq(model.config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        c, m = self.config, self.model.model
        T = input_ids.shape[1]
        x = F.embedding(input_ids, m.embed_tokens.weight)
        attn_layers = c.full_attention_layers
        rope = None
        if attn_layers:  # P = tokens already in the cache, from the first attention layer's keys
            P = past[self._index(attn_layers[0])].shape[2]
            pos = (torch.arange(T, device=x.device) + P).float()
            freqs = pos[:, None] * self.inv_freq
            emb = torch.cat([freqs, freqs], dim=-1)
            rope = (emb.cos() * self.rope_scale, emb.sin() * self.rope_scale, P)
        present, j = [], 0
        for layer, kind in zip(m.layers, c.layer_types):
            h = rms_norm(x, layer.input_layernorm.weight, c.rms_norm_eps)
            if kind == "linear_attention":
                y, s1, s2 = self._deltanet(layer.linear_attn, h, past[j], past[j + 1])
            else:
                y, s1, s2 = self._attention(layer.self_attn, h, past[j], past[j + 1], rope)
            present += [s1, s2]
            j += 2
            x = x + y
            mlp = layer.mlp
            h = rms_norm(x, layer.post_attention_layernorm.weight, c.rms_norm_eps)
            x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                             mlp.down_proj.weight)
        h = rms_norm(x[:, -1:], m.norm.weight, c.rms_norm_eps)  # the vocabulary projection: last position only
        logits = F.linear(h if self.head_matmul else h[:, 0], self.model.head_weight)  # 3-D input: a MatMul
        if self.head_matmul:
            logits = logits[:, 0]
        return (logits, *present)

    def _index(self, layer: int) -> int:
        return 2 * layer  # every layer holds two cache tensors

    def _deltanet(self, m, h, conv, rec):
        B, T, _ = h.shape
        K, Hk, Hv, Dk, Dv = m.kernel_size, m.num_k_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
        qkv = F.linear(h, m.in_proj_qkv.weight)
        window = torch.cat([conv, qkv], dim=1)  # [B, K-1+T, C]: token t's taps end at row t+K-1
        w = m.conv1d.weight[:, 0]  # [C, K]
        y = window[:, 0:T] * w[:, 0]
        for j in range(1, K):
            y = y + window[:, j : j + T] * w[:, j]
        new_conv = window[:, -(K - 1):]
        q, k, v = F.silu(y).split([m.key_dim, m.key_dim, m.value_dim], dim=-1)

        def heads(x):  # l2-normalised, each key head repeated to its Hv/Hk consecutive value heads
            x = x.reshape(B, T, Hk, 1, Dk)
            x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)
            return x.expand(B, T, Hk, Hv // Hk, Dk).reshape(B, T, Hv * Dk)

        beta = torch.sigmoid(F.linear(h, m.in_proj_b.weight))
        g = -m.A_log.exp() * F.softplus(F.linear(h, m.in_proj_a.weight) + m.dt_bias)
        o, new_rec = torch.ops.qwen35_onnx.gated_delta(heads(q), heads(k), v, rec, g, beta, Hv, Dk**-0.5)
        z = F.linear(h, m.in_proj_z.weight).reshape(B, T, Hv, Dv)
        o = rms_norm(o.reshape(B, T, Hv, Dv), m.norm.weight, m.norm.eps, offset=0.0) * F.silu(z)
        return F.linear(o.reshape(B, T, Hv * Dv), m.out_proj.weight), new_conv, new_rec

    def _attention(self, m, h, past_k, past_v, rope):
        B, T, _ = h.shape
        Hq, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
        eps = m.q_norm.eps
        qg = F.linear(h, m.q_proj.weight).reshape(B, T, Hq, 2 * D)
        q, gate = qg[..., :D], qg[..., D:]
        q = rms_norm(q, m.q_norm.weight, eps).transpose(1, 2)
        k = rms_norm(F.linear(h, m.k_proj.weight).reshape(B, T, Hkv, D), m.k_norm.weight, eps).transpose(1, 2)
        v = F.linear(h, m.v_proj.weight).reshape(B, T, Hkv, D).transpose(1, 2)
        cos, sin, P = rope
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        S = k_all.shape[2]
        G = Hq // Hkv
        # GQA as a reshape: the G query heads of a KV head become G*T rows against that head's keys
        qr = q.reshape(B, Hkv, G * T, D)
        scores = (qr @ k_all.transpose(-1, -2)) * D**-0.5  # [B, Hkv, G*T, S]
        if not self.decode:  # query t (position P+t) sees keys 0..P+t
            allowed = torch.arange(S, device=h.device)[None, :] <= (torch.arange(T, device=h.device) + P)[:, None]
            bias = torch.zeros(T, S, device=h.device).masked_fill(~allowed, float("-inf"))
            scores = (scores.reshape(B, Hkv, G, T, S) + bias).reshape(B, Hkv, G * T, S)
        out = (torch.softmax(scores, dim=-1) @ v_all).reshape(B, Hq, T, D)
        out = out.transpose(1, 2).reshape(B, T, Hq * D) * torch.sigmoid(gate.reshape(B, T, Hq * D))
        return F.linear(out, m.o_proj.weight), k_all, v_all


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half on the first R dims of x [B, H, T, D]; cos, sin [T, R]."""
    R = cos.shape[-1]
    rot, rest = x[..., :R], x[..., R:]
    rotated = torch.cat([-rot[..., R // 2 :], rot[..., : R // 2]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)
