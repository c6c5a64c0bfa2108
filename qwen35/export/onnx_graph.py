"""The export-friendly forward of a Qwen3.5 text model: every piece of state is an explicit tensor.

`GraphModel(config, weights, decode)` runs a Qwen3.5 text model on the initializers `graph_weights` names
(each made from one checkpoint parameter by `transform`): `forward(input_ids, *past) -> (logits of the last
position, *present)`, where `past` / `present` are,
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


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w, w the norm's whole multiplier (`graph_weights` adds the zero-centred
    norms' 1 to their weight beforehand: no op in the graph may have only weights as inputs, see there)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


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


# How a graph initializer is made from a checkpoint parameter (`graph_weights`): the name suffix says which.
TRANSPOSED = "__T"  # [K, N] for MatMul (the checkpoint holds [N, K])
PLUS_ONE = "__plus_one"  # 1 + w: a zero-centred norm's multiplier
NEG_EXP = "__neg_exp"  # -exp(A_log): the Gated DeltaNet's decay rate
TAP = "__tap"  # conv1d.weight[:, 0, j] (suffix + j): one tap of the depthwise causal conv


def graph_weights(config, head_matmul: bool) -> dict[str, tuple[str, str]]:
    """Every initializer GraphModel reads that comes from a parameter: graph name -> (parameter name, suffix),
    in graph order. The graph computes nothing from weights alone (no transpose, no 1 + w, no slice of a
    weight): the exporter's optimizer folds such ops into constants it computes itself, and the weights it
    sees are placeholders (`export_graph`), so each of those steps is done here once, while the initializer
    is written from the checkpoint (onnx_weights.py)."""
    c, w = config, {}

    def add(param: str, suffix: str = "") -> None:
        w[param + suffix] = (param, suffix)

    add("model.embed_tokens.weight")
    for i, kind in enumerate(c.layer_types):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", PLUS_ONE)
        if kind == "linear_attention":
            a = p + "linear_attn."
            add(a + "in_proj_qkv.weight", TRANSPOSED)
            for j in range(c.linear_conv_kernel_dim):
                add(a + "conv1d.weight", f"{TAP}{j}")
            add(a + "in_proj_b.weight", TRANSPOSED)
            add(a + "in_proj_a.weight", TRANSPOSED)
            add(a + "dt_bias")
            add(a + "A_log", NEG_EXP)
            add(a + "in_proj_z.weight", TRANSPOSED)
            add(a + "norm.weight")  # the gated norm's weight is its multiplier as it is
            add(a + "out_proj.weight", TRANSPOSED)
        else:
            a = p + "self_attn."
            for proj in ("q_proj", "k_proj", "v_proj"):
                add(a + proj + ".weight", TRANSPOSED)
            add(a + "q_norm.weight", PLUS_ONE)
            add(a + "k_norm.weight", PLUS_ONE)
            add(a + "o_proj.weight", TRANSPOSED)
        add(p + "post_attention_layernorm.weight", PLUS_ONE)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            add(p + f"mlp.{proj}.weight", TRANSPOSED)
    add("model.norm.weight", PLUS_ONE)
    head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    # a MatMul on its own [hidden, vocab] copy (what weight quantizers rewrite), or a Gemm reading the
    # [vocab, hidden] matrix in place (the tied table then serves the lookup and the head once)
    add(head, TRANSPOSED if head_matmul else "")
    return w


def transform(w: torch.Tensor, suffix: str) -> torch.Tensor:
    """The initializer `suffix` names, from its parameter's values (any float dtype) -> fp32."""
    w = w.float()
    if suffix == "":
        return w
    if suffix == TRANSPOSED:
        return w.T.contiguous()
    if suffix == PLUS_ONE:
        return 1.0 + w
    if suffix == NEG_EXP:
        return -w.exp()
    if suffix.startswith(TAP):
        return w[:, 0, int(suffix[len(TAP):])].contiguous()
    raise AssertionError(suffix)


class GraphModel(nn.Module):
    """forward(input_ids [B, T] int64, *past) -> (logits [B, vocab] fp32 of the last position, *present).
    weights: `graph_weights(config, head_matmul)`'s names -> tensors (their values, or placeholders of their
    shapes for an export). decode=True: the one-token graph (T = 1: no causal mask to build). head_matmul=True:
    the vocabulary projection as a MatMul on its [hidden, vocab] copy instead of a Gemm on the table."""

    def __init__(self, config, weights: dict[str, torch.Tensor], decode: bool = False, head_matmul: bool = False):
        super().__init__()
        self.config, self.decode, self.head_matmul = config, decode, head_matmul
        self.keys = {}  # graph name -> attribute name (parameter names cannot hold dots)
        for i, (name, t) in enumerate(weights.items()):
            self.keys[name] = f"w{i}"
            self.register_parameter(f"w{i}", nn.Parameter(t, requires_grad=False))
        inv_freq, self.rope_scale = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def w(self, name: str) -> torch.Tensor:
        return getattr(self, self.keys[name])

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        c, w = self.config, self.w
        T = input_ids.shape[1]
        x = F.embedding(input_ids, w("model.embed_tokens.weight"))
        attn_layers = c.full_attention_layers
        rope = None
        if attn_layers:  # P = tokens already in the cache, from the first attention layer's keys
            P = past[2 * attn_layers[0]].shape[2]  # every layer holds two cache tensors
            pos = (torch.arange(T, device=x.device) + P).float()
            freqs = pos[:, None] * self.inv_freq
            emb = torch.cat([freqs, freqs], dim=-1)
            rope = (emb.cos() * self.rope_scale, emb.sin() * self.rope_scale, P)
        present = []
        for i, kind in enumerate(c.layer_types):
            p = f"model.layers.{i}."
            h = rms_norm(x, w(p + "input_layernorm.weight" + PLUS_ONE), c.rms_norm_eps)
            if kind == "linear_attention":
                y, s1, s2 = self._deltanet(p + "linear_attn.", h, past[2 * i], past[2 * i + 1])
            else:
                y, s1, s2 = self._attention(p + "self_attn.", h, past[2 * i], past[2 * i + 1], rope)
            present += [s1, s2]
            x = x + y
            h = rms_norm(x, w(p + "post_attention_layernorm.weight" + PLUS_ONE), c.rms_norm_eps)
            m = p + "mlp."
            x = x + (F.silu(h @ w(m + "gate_proj.weight" + TRANSPOSED)) * (h @ w(m + "up_proj.weight" + TRANSPOSED))
                     ) @ w(m + "down_proj.weight" + TRANSPOSED)
        h = rms_norm(x[:, -1:], w("model.norm.weight" + PLUS_ONE), c.rms_norm_eps)  # the last position only
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        if self.head_matmul:
            return ((h @ w(head + TRANSPOSED))[:, 0], *present)
        return (F.linear(h[:, 0], w(head)), *present)

    def _deltanet(self, p, h, conv, rec):
        c, w = self.config, self.w
        B, T, _ = h.shape
        K, Hk, Hv = c.linear_conv_kernel_dim, c.linear_num_key_heads, c.linear_num_value_heads
        Dk, Dv = c.linear_key_head_dim, c.linear_value_head_dim
        qkv = h @ w(p + "in_proj_qkv.weight" + TRANSPOSED)
        window = torch.cat([conv, qkv], dim=1)  # [B, K-1+T, C]: token t's taps end at row t+K-1
        y = window[:, 0:T] * w(p + "conv1d.weight" + f"{TAP}0")
        for j in range(1, K):
            y = y + window[:, j : j + T] * w(p + "conv1d.weight" + f"{TAP}{j}")
        new_conv = window[:, -(K - 1):]
        q, k, v = F.silu(y).split([c.linear_key_dim, c.linear_key_dim, c.linear_value_dim], dim=-1)

        def heads(x):  # l2-normalised, each key head repeated to its Hv/Hk consecutive value heads
            x = x.reshape(B, T, Hk, 1, Dk)
            x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)
            return x.expand(B, T, Hk, Hv // Hk, Dk).reshape(B, T, Hv * Dk)

        beta = torch.sigmoid(h @ w(p + "in_proj_b.weight" + TRANSPOSED))
        g = w(p + "A_log" + NEG_EXP) * F.softplus(h @ w(p + "in_proj_a.weight" + TRANSPOSED) + w(p + "dt_bias"))
        o, new_rec = torch.ops.qwen35_onnx.gated_delta(heads(q), heads(k), v, rec, g, beta, Hv, Dk**-0.5)
        z = (h @ w(p + "in_proj_z.weight" + TRANSPOSED)).reshape(B, T, Hv, Dv)
        o = rms_norm(o.reshape(B, T, Hv, Dv), w(p + "norm.weight"), c.rms_norm_eps) * F.silu(z)
        return o.reshape(B, T, Hv * Dv) @ w(p + "out_proj.weight" + TRANSPOSED), new_conv, new_rec

    def _attention(self, p, h, past_k, past_v, rope):
        c, w = self.config, self.w
        B, T, _ = h.shape
        Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        eps = c.rms_norm_eps
        qg = (h @ w(p + "q_proj.weight" + TRANSPOSED)).reshape(B, T, Hq, 2 * D)
        q, gate = qg[..., :D], qg[..., D:]
        q = rms_norm(q, w(p + "q_norm.weight" + PLUS_ONE), eps).transpose(1, 2)
        k = rms_norm((h @ w(p + "k_proj.weight" + TRANSPOSED)).reshape(B, T, Hkv, D), w(p + "k_norm.weight" + PLUS_ONE),
                     eps).transpose(1, 2)
        v = (h @ w(p + "v_proj.weight" + TRANSPOSED)).reshape(B, T, Hkv, D).transpose(1, 2)
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
        return out @ w(p + "o_proj.weight" + TRANSPOSED), k_all, v_all


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half on the first R dims of x [B, H, T, D]; cos, sin [T, R]."""
    R = cos.shape[-1]
    rot, rest = x[..., :R], x[..., R:]
    rotated = torch.cat([-rot[..., R // 2 :], rot[..., : R // 2]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)
