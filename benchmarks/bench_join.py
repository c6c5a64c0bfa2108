"""What a request joining or leaving a running batch costs, against the other rows' context length.

A batch of 7 rows on the Qwen3.5-0.8B cache shape (6 attention layers of 2x256 KV heads, 18 Gated DeltaNet
layers of 16x128x128 fp32 state, bf16): one row holds `--long` tokens (1K, 16K, 64K), six hold 100. Times
the join of an 8th row (100 tokens) and the leave of a short row. With rows that own their KV, neither may
grow with the long row's context; the previous layout (one left-padded KV tensor per layer) copied every
row's KV on each join and leave.

    python benchmarks/bench_join.py [--baseline REV]

--baseline REV runs the same measurement on qwen35 at git revision REV (temporary worktree), side by side.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from baseline import checkout, run_json

HERE = Path(__file__).resolve().parent

CODE = r"""
import json, sys, time, torch
from qwen35.config import ModelConfig
from qwen35.shapes import text_config
cfg = ModelConfig.from_hf(text_config("0.8b"))
lengths = [int(x) for x in sys.argv[1].split(",")]
H, D = cfg.num_key_value_heads, cfg.head_dim
res = {}
try:
    from qwen35.cache import CacheLayout, HybridCache
    layout = CacheLayout(cfg.layer_types, H, D, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim,
                         cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                         torch.bfloat16)

    def row(n):
        states = [(torch.zeros(1, H, n, D, dtype=torch.bfloat16),) * 2 if t == "full_attention" else
                  (torch.zeros(1, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim, dtype=torch.bfloat16),
                   torch.zeros(1, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim))
                  for t in cfg.layer_types]
        return HybridCache.from_tensors(layout, states)

    join = lambda batch, one: HybridCache.merge([batch, one])
    def leave(batch, keep):
        batch.filter(keep)
        return batch
    layout_name = "rows own their KV"
except ImportError:  # the previous layout: one left-padded KV tensor per layer
    from qwen35.cache import DeltaNetState, HybridCache, KVCache
    from qwen35.server import batch as batching

    def row(n):
        layers = []
        for t in cfg.layer_types:
            if t == "full_attention":
                kv = KVCache(1, H, D, torch.bfloat16)
                kv._writable(n)
                kv.length = n
                layers.append(kv)
            else:
                layers.append(DeltaNetState(1, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim,
                                            cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                            cfg.linear_value_head_dim, torch.bfloat16))
        c = HybridCache(layers, 1)
        c.offset = n
        return c

    join = batching.merge
    leave = batching.remove
    layout_name = "left-padded batch tensor"

for long in lengths:
    batch = row(long) if layout_name == "rows own their KV" else join(None, row(long))
    for _ in range(6):
        batch = join(batch, row(100))
    ts_join, ts_leave = [], []
    for _ in range(10):
        one = row(100)
        t = time.perf_counter()
        b2 = join(batch, one)
        ts_join.append(time.perf_counter() - t)
        t = time.perf_counter()
        b3 = leave(b2, [i for i in range(8) if i != 3])
        ts_leave.append(time.perf_counter() - t)
        batch = b3
    res[str(long)] = {"join_ms": 1e3 * min(ts_join), "leave_ms": 1e3 * min(ts_leave)}
print(json.dumps({"layout": layout_name, "by_long_context": res}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", default="1024,16384,65536", help="context lengths of the long row")
    ap.add_argument("--baseline", default=None, help="also measure qwen35 at this git revision")
    args = ap.parse_args()
    rows = {}
    if args.baseline:
        with checkout(args.baseline) as code:
            rows[f"qwen35@{args.baseline}"] = run_json(CODE, args.long, code_dir=code)
    rows["qwen35"] = run_json(CODE, args.long)
    lengths = args.long.split(",")
    print(f"{'engine':<16}{'layout':<26}" + "".join(f"{'join@' + n:>13}{'leave@' + n:>13}" for n in lengths)
          + "   (ms; 7-row batch, one long row)")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<16}failed: {r['error']}")
            continue
        cells = "".join(f"{r['by_long_context'][n]['join_ms']:>13.2f}{r['by_long_context'][n]['leave_ms']:>13.2f}"
                        for n in lengths)
        print(f"{name:<16}{r['layout']:<26}{cells}")
    print(json.dumps({"bench": "join", **{k: v for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
