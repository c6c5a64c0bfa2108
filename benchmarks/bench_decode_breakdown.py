"""Where a decode token's time goes, on the Qwen3.5-0.8B shape (random weights, bf16).

Measures, in one process and alternating so the machine's drift hits both alike:
- a full decode step (the model's forward for one token, cache at ~256 tokens);
- the same weight GEMVs alone, in decode order (the memory-streaming floor of the step);
- each phase of a Gated DeltaNet layer (norm, in-projection, delta-rule step, out-projection, MLP), called as
  separate ops and averaged over the 18 layers.
Prints a table, then one JSON line.

With --threads-ab it also times the decode step with 2 and 1 intra-op threads, alternating (the kernels
must really use both cores: see `torch.ops.qwen35.parallel_threads`).

    python benchmarks/bench_decode_breakdown.py [--model DIR] [--repeats 3] [--threads-ab]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def median_ms(f, n: int = 15) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=HERE / ".cache" / "replica-0.8b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads-ab", action="store_true")
    args = ap.parse_args()

    from qwen35.commands.replica import build_replica
    from qwen35.ops import kernels
    from qwen35.ops.linear import matrix
    from qwen35.runtime import tune_allocator
    from qwen35.weights import load_model

    if not (args.model / "config.json").is_file():
        build_replica(args.model, "0.8b")
    if not kernels.available():
        sys.exit(f"the fast kernels are unavailable: {kernels.unavailable_reason()}")
    tune_allocator()
    torch.set_grad_enabled(False)
    model = load_model(args.model, dtype=torch.bfloat16)
    ops = torch.ops.qwen35
    cache = model.make_cache(1)
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, 256)), cache=cache, logits_to_keep=1)
    token = torch.tensor([[5]])

    order, gdn = [], []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        gate_up = matrix(mlp._gate_up)
        if layer.layer_type == "linear_attention":
            g = layer.linear_attn
            w_in = matrix(g._in_proj)
            order += [w_in, g.out_proj.weight]
            gdn.append((layer, g, w_in, gate_up, cache.layers[i], g.conv1d.weight[:, 0].contiguous()))
        else:
            a = layer.self_attn
            order += [matrix(a._qkv), a.o_proj.weight]
        order += [gate_up, mlp.down_proj.weight]
    order.append(model.head_weight)
    inputs = [torch.randn(1, w.shape[1]).to(torch.bfloat16) for w in order]
    nbytes = sum(w.numel() * w.element_size() for w in order)

    def step():
        with torch.inference_mode():
            model(token, cache=cache, logits_to_keep=1)

    def gemvs():
        for w, x in zip(order, inputs):
            ops.gemv_bf16(x, w, w is order[-1])

    phases: dict[str, float] = defaultdict(float)
    x0 = torch.randn(1, model.config.hidden_size).to(torch.bfloat16)

    def gdn_phases(n: int = 5) -> None:
        for _ in range(n):
            h = x0
            for layer, g, w_in, gate_up, st, conv_w in gdn:
                eps = layer.input_layernorm.eps
                t = [time.perf_counter()]
                a = ops.rmsnorm(h, layer.input_layernorm.weight, eps, True)
                t.append(time.perf_counter())
                proj = ops.gemv_bf16(a, w_in, False)
                t.append(time.perf_counter())
                o, _, _ = ops.gdn_decode(proj, st.conv, conv_w, g.A_log, g.dt_bias, st.recurrent, g.norm.weight,
                                         g.num_k_heads, eps)
                t.append(time.perf_counter())
                x1 = h + ops.gemv_bf16(o, g.out_proj.weight, False)
                t.append(time.perf_counter())
                a2 = ops.rmsnorm(x1, layer.post_attention_layernorm.weight, eps, True)
                t.append(time.perf_counter())
                act = ops.silu_mul(ops.gemv_bf16(a2, gate_up, False))
                t.append(time.perf_counter())
                h = x1 + ops.gemv_bf16(act, layer.mlp.down_proj.weight, False)
                t.append(time.perf_counter())
                for name, dt in zip(("norm 1", "in-projection", "delta-rule step", "out-projection + add", "norm 2",
                                     "gate/up + SiLU", "down + add"), (b - a for a, b in zip(t, t[1:]))):
                    phases[name] += dt / n / len(gdn) / args.repeats

    rows = []
    for _ in range(args.repeats):
        rows.append((median_ms(step), median_ms(gemvs)))
        gdn_phases()
    print(f"{'run':>4}{'decode step ms':>16}{'GEMVs alone ms':>16}{'GEMV GB/s':>11}{'rest ms':>9}")
    for i, (s, g) in enumerate(rows):
        print(f"{i + 1:>4}{s:>16.2f}{g:>16.2f}{nbytes / g / 1e6:>11.1f}{s - g:>9.2f}")
    print(f"\nGated DeltaNet layer, per layer (mean of {len(gdn)} layers):")
    for name, v in phases.items():
        print(f"  {name:<22}{v * 1e6:>8.1f} us")
    result = {"bench": "decode_breakdown", "step_ms": [round(s, 2) for s, _ in rows],
              "gemv_ms": [round(g, 2) for _, g in rows], "gemv_bytes": nbytes,
              "gdn_layer_us": {k: round(v * 1e6, 1) for k, v in phases.items()}}
    if args.threads_ab:
        before = torch.get_num_threads()
        ab: dict[int, list[float]] = {2: [], 1: []}
        for _ in range(args.repeats):
            for n in (2, 1):
                torch.set_num_threads(n)
                ab[n].append(median_ms(step))
        torch.set_num_threads(before)
        print("\ndecode step ms with 2 / 1 threads, alternating: "
              + ", ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(ab[2], ab[1])))
        result["step_ms_threads"] = {str(k): [round(v, 2) for v in vs] for k, vs in ab.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
