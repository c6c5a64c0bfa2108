"""A decode step's whole decoder stack in one C++ call (kernels/decode_stack.cpp).

With every layer bound to its whole-layer kernel (ops/fast.py: decode_gdn_layer / decode_attn_layer), what
was left in Python per token was the loop calling them: 24 calls on the 0.8B, each through the module call,
the layer's bound forward and the dispatcher with ~20 arguments, every one of them missing the caches that
the weight stream had just flushed. Measured on the 0.8B int4 replica at 512 tokens of context: the layers
took 15.4 ms a token inside C++ and 18.3 ms seen from Python, ~12% of the step. `DecodeStack` gives the
C++ plan each layer's constant arguments once (the same tuples the per-layer forms use, `layer.layer_args`),
and a step passes only what changes. The same layer functions run in the same order: the results, the cache
contents and the kept per-token states (speculative verification) are those of the per-layer path bit for
bit (tests/test_decode_stack.py).

It applies to the calls the whole-layer kernels take (`layer_decode.layer_decoding`: up to 8 tokens a row, a cache,
no autograd, no packed-document masks) when no layer has forward hooks (they would not run); otherwise the
model's loop runs each layer as before.
"""

from __future__ import annotations

import torch

from .layer_decode import exclusive, kv_scales, layer_decoding, rope_rows


class DecodeStack:
    """The constant arguments of every layer of `model.model.layers`, each bound to a whole-layer kernel
    (bind_kernels builds one only then), held by a C++ DecodePlan."""

    def __init__(self, model, portable: bool = False):
        self.layers = list(model.model.layers)
        # the portable library's plan and op where the AVX512 one cannot load (kernels/portable_layers.cpp)
        self.portable = portable
        self.plan = (torch.classes.qwen35.PortableDecodePlan if portable else torch.classes.qwen35.DecodePlan)()
        self.op = torch.ops.qwen35.portable_decode_stack if portable else torch.ops.qwen35.decode_stack
        prefix = "portable_" if portable else ""
        self.gdn, self.attn = [], []  # layer indices of each kind, in order
        for i, layer in enumerate(self.layers):
            kind = getattr(layer.forward, "kernel", None)
            if kind == prefix + "gdn_layer_decode":
                pre, mid, post = layer.layer_args
                self.plan.add_gdn(*pre, *mid, *post)
                self.gdn.append(i)
            elif kind == prefix + "attn_layer_decode":
                pre, post = layer.layer_args
                self.plan.add_attn(*pre, *post)
                self.attn.append(i)
            else:
                raise ValueError(f"layer {i} has no whole-layer decode kernel ({kind!r}): no decode stack")

    def __call__(self, x: torch.Tensor, cache, ctx) -> torch.Tensor | None:
        """x [B, T, H] through every layer, cache updated as the per-layer calls would; None where this
        call is not one the whole-layer kernels take."""
        states = cache.layers
        if not layer_decoding(x, states[0], ctx) or any(
                m._forward_hooks or m._forward_pre_hooks for m in self.layers):
            return None
        B, T, H = x.shape
        gdn = [states[i] for i in self.gdn]
        in_place = [T == 1 and exclusive(s) for s in gdn]
        k_buf, v_buf, k_scale, v_scale = [], [], [], []
        for i in self.attn:
            bufs = states[i].buffers(T)
            k_buf += [b.k for b in bufs]
            v_buf += [b.v for b in bufs]
            ks, vs = kv_scales(states[i], bufs)
            k_scale += ks
            v_scale += vs
        cos, sin = rope_rows(ctx.rope)
        out, convs, recs = self.op.default(
            self.plan, x.reshape(B * T, H).contiguous(), [s.conv.contiguous() for s in gdn],
            [s.recurrent.contiguous() for s in gdn], cos, sin, k_buf, v_buf, k_scale, v_scale,
            [r.length for r in cache.rows], in_place)
        for j, s in enumerate(gdn):
            s.take(convs[j * T : (j + 1) * T], recs[j * T : (j + 1) * T])
        return out.view(B, T, H)
