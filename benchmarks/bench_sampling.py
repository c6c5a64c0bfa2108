"""What drawing a token costs, against the whole-vocabulary way, alone and inside a decode.

qwen35's Sampler applies penalties at the ids they concern and finds the tokens top-k / top-p / min-p leave
from a top-k kernel before normalizing anything (sampling.py). The previous Sampler (kept here as
`WholeVocabulary`) ran the formulas over all 248,320 logits every token: a full sort for top-p, the penalties
as vocabulary-sized tensors, torch.multinomial over every probability. Part one times one draw per setting,
caches cold (a 600 MiB write between draws, as the weight stream leaves them in a decode) and warm. Part two
decodes the 0.8B replica (int4 by default) with the model card's non-thinking preset, the two samplers
alternating in one process, and greedy beside them. Prints tables, then one JSON line.

    python benchmarks/bench_sampling.py [--quant int4] [--tokens 96] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from qwen35.sampling import Sampler, SamplingParams, preset

HERE = Path(__file__).resolve().parent
REPLICA = HERE / ".cache" / "replica-0.8b"
SETTINGS = {
    "non-thinking preset": preset(False),
    "thinking preset": preset(True),
    "temperature 0.7": SamplingParams(temperature=0.7),
    "top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "min_p 0.05": SamplingParams(min_p=0.05),
    "greedy": SamplingParams(temperature=0),
    "greedy + presence 1.5": SamplingParams(temperature=0, presence_penalty=1.5),
}


class WholeVocabulary(Sampler):
    """The previous Sampler's draw: every formula over the whole vocabulary in fp32, torch.multinomial."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        x = self.reference_process(logits)
        if p.greedy:
            return x.argmax(-1)
        x = x / p.temperature
        if p.top_k and p.top_k < x.shape[-1]:
            kth = x.topk(p.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = x.sort(dim=-1, descending=True)
            probs = sorted_x.softmax(-1)
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            x = x.scatter(-1, idx, sorted_x.masked_fill(drop, float("-inf")))
        if p.min_p > 0:
            probs = x.softmax(-1)
            x = x.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
        return torch.multinomial(x.softmax(-1), 1, generator=self.generator)[:, 0]


def time_draws(cls, params: SamplingParams, x: torch.Tensor, flush: torch.Tensor | None, n: int = 30) -> float:
    s = cls(params, x.shape[-1], 1, [[1, 2, 3]], generator=torch.Generator().manual_seed(0))
    ts = []
    for _ in range(n):
        if flush is not None:
            flush.add_(1)
        t = time.perf_counter()
        s.observe(s(x))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPLICA)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"bench": "sampling", "draw_ms": {}, "decode": {}}

    x = torch.randn(1, 248320, generator=torch.Generator().manual_seed(0)) * 3
    flush = torch.empty(600 * 2**20 // 4)
    print("one draw from 248,320 logits, ms (median of 30)")
    print(f"{'setting':24}{'cold: this':>12}{'previous':>10}{'warm: this':>12}{'previous':>10}")
    for name, params in SETTINGS.items():
        row = [time_draws(c, params, x, f) for f in (flush, None) for c in (Sampler, WholeVocabulary)]
        print(f"{name:24}{row[0]:12.2f}{row[1]:10.2f}{row[2]:12.2f}{row[3]:10.2f}")
        result["draw_ms"][name] = {"cold": round(row[0], 3), "cold_previous": round(row[1], 3),
                                   "warm": round(row[2], 3), "warm_previous": round(row[3], 3)}

    import qwen35.generation as G
    from bench_gemv_ab import decode_model

    model, _ = decode_model(args.model, args.quant, args.threads)
    ids = torch.randint(0, 240000, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    chat = replace(preset(False), max_tokens=args.tokens + 1, seed=1)
    runs = {"greedy": (Sampler, SamplingParams(temperature=0, max_tokens=args.tokens + 1)),
            "preset, this Sampler": (Sampler, chat), "preset, previous": (WholeVocabulary, chat)}
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, (cls, params) in runs.items():
            sampler = cls(params, model.config.vocab_size, 1, [ids])
            gen = G.generate_step(model, ids, sampler=sampler)
            next(gen)  # the prefill's token
            t = time.perf_counter()
            n = sum(1 for _ in gen)
            rates[name].append(n / (time.perf_counter() - t))
    print(f"\ndecode after a 512-token prompt, {args.quant}, {args.tokens} tokens, tok/s per round (same process)")
    for name, r in rates.items():
        print(f"{name:24}" + " ".join(f"{v:7.1f}" for v in r))
        result["decode"][name] = [round(v, 2) for v in r]
    ratio = statistics.median(a / b for a, b in zip(rates["preset, this Sampler"], rates["preset, previous"]))
    print(f"preset decode, this / previous Sampler: {ratio:.2f}x (median of rounds)")
    result["decode"]["preset_speedup"] = round(ratio, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
