"""Speculative decoding with the MTP head, side by side with plain decoding in one run.

1. The bundled model (its MTP head is trained): acceptance per draft position and decode tok/s, plain vs
   drafting (k = 1..4 and adaptive; full vs reduced draft vocabulary), greedy on a few code prompts.
2. The cost model on the 0.8B shape (random weights: no real acceptance). The real MTP head runs (its cost
   counts) but its proposals are replaced (Speculation.propose) by a recorded greedy continuation corrupted
   at rate 1 - r, through the same verify/rollback path: decode tok/s vs acceptance r for k = 1..4, with the
   full and the reduced draft vocabulary; the break-even acceptance per k (from the measured round times);
   the rollback (rewind + MTP truncate) as a fraction of a decode step.
Prints tables and a final JSON line. Run it on a quiet machine and keep `uptime` beside the numbers.

    python benchmarks/bench_speculative.py [--replica benchmarks/.cache/replica-0.8b] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qwen35
from qwen35.commands.common import default_model
from qwen35.draft_policy import expected_tokens
from qwen35.speculative import Speculation

CODE = ("import os\n\n\ndef main(argv):\n", "class Stack:\n    def push(self, item):\n",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "for i in range(10):\n")


def decode_rate(model, ids, params, spec=None) -> tuple[float, list[int]]:
    """(decode tok/s after the first token, tokens)."""
    steps = qwen35.generate_step(model, ids, params=params, speculative=spec)
    toks = [next(steps).token]
    t0 = time.perf_counter()
    toks += [r.token for r in steps]
    return (len(toks) - 1) / (time.perf_counter() - t0), toks


def bundled(tokens: int, draft_vocab: int) -> dict:
    model, tok = qwen35.load(default_model(), dtype=torch.bfloat16, kernels=True)
    params = qwen35.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = [tok.encode(t) for t in CODE]
    decode_rate(model, prompts[0][:4], qwen35.SamplingParams(temperature=0, max_tokens=8),
                Speculation(draft_tokens=2))  # warm-up: kernels built
    configs = [("plain", None)] + [(f"k={k}", {"draft_tokens": k}) for k in (1, 2, 3, 4)] + \
        [("adaptive", {}), (f"k=3 vocab {draft_vocab}", {"draft_tokens": 3, "draft_vocab": draft_vocab}),
         (f"adaptive vocab {draft_vocab}", {"draft_vocab": draft_vocab})]
    rows, want = {}, None
    print(f"bundled model ({len(prompts)} code prompts, {tokens} greedy tokens each, bf16, kernels)")
    print(f"{'config':>22}{'tok/s':>9}{'x plain':>9}{'tok/round':>11}  acceptance per position")
    for name, kw in configs:
        spec = None if kw is None else Speculation(always_draft=tok.eos_token_ids, **kw)
        rates, outs = [], []
        for p in prompts:
            rate, toks = decode_rate(model, p, params, spec)
            rates.append(rate)
            outs.append(toks)
        if want is None:
            want = outs
        assert outs == want, f"{name}: tokens differ from plain decoding"
        rate = sum(rates) / len(rates)
        st = spec.stats if spec else None
        rows[name] = {"tok_s": round(rate, 2), "speedup": round(rate / rows["plain"]["tok_s"], 3) if rows else 1.0,
                      **({"acceptance": [round(a, 3) for a in st.acceptance],
                          "tokens_per_round": round(st.tokens_per_round, 3),
                          "rounds_by_k": st.rounds_by_k} if st else {})}
        acc = " ".join(f"{a:.2f}" for a in st.acceptance) if st else ""
        print(f"{name:>22}{rate:>9.1f}{rows[name]['speedup']:>9.2f}{st.tokens_per_round if st else 1:>11.2f}  {acc}")
    # how much of the text the reduced vocabulary covers (why its acceptance barely moves)
    flat = [t for o in want for t in o]
    rows["draft_vocab_coverage"] = round(sum(t < draft_vocab for t in flat) / len(flat), 4)
    print(f"first {draft_vocab} ids cover {rows['draft_vocab_coverage']:.1%} of the generated tokens")
    return rows


def prefix_context(prefix: int = 1100, files: int = 12) -> dict:
    """Does the MTP head draft better when its own KV covers a restored prefix? A prefix restored from a
    snapshot has no MTP entries (the head then attends only to what came after it). Per held-out file: the
    first `prefix` tokens prefilled with the MTP KV built ("full") or without it ("suffix", as after a restore),
    then 10 more prompt tokens and 64 greedy tokens drafted k=3; tokens per round, summed over the files."""
    import sysconfig

    from qwen35 import speculative as S
    from qwen35.generation import Stream
    from qwen35.generation import prefill as plain_prefill

    model, tok = qwen35.load(default_model(), dtype=torch.bfloat16, kernels=True)
    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [tok.encode(f.read_text(encoding="utf-8")) for f in sorted(lib.glob("*.py"))[5::7][:files]]
    params = qwen35.SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    tot = {"full": [0.0, 0], "suffix": [0.0, 0]}
    with torch.no_grad():
        for ids in (t for t in texts if len(t) >= prefix + 10):
            pre, suf = ids[:prefix], ids[prefix : prefix + 10]
            for mode in tot:
                spec = Speculation(draft_tokens=3)
                cache, mcache = model.make_cache(), model.make_mtp_cache()
                if mode == "full":
                    S.prefill(model, pre, cache, mcache, 512)
                else:
                    plain_prefill(model, torch.tensor([pre]), cache, 512)
                stream, row = Stream.start(model, pre + suf, params), spec.new_row(params)
                logits, last_h = S.prefill(model, suf, cache, mcache, 512)
                S.start(row, stream.sample(logits), last_h)
                while stream.finish is None:
                    S.step(model, cache, mcache, [stream], [row], spec)
                tot[mode][0] += spec.stats.tokens_per_round * spec.stats.rounds
                tot[mode][1] += spec.stats.rounds
    out = {m: round(a / max(n, 1), 3) for m, (a, n) in tot.items()}
    print(f"MTP KV over a {prefix}-token prefix: tokens per round (k=3) with it {out['full']:.3f}, "
          f"without (as after a restore) {out['suffix']:.3f}")
    return out


def corrupted(ref: list[int], r: float, vocab: int, seed: int):
    """A draft source accepted with probability r per token: the recorded continuation, or (1 - r) a wrong one."""
    rng = random.Random(seed)

    def propose(so_far: list[int], _draft: int) -> int:
        t = ref[len(so_far)] if len(so_far) < len(ref) else 0
        return t if rng.random() < r else (t + 1) % vocab
    return propose


def cost_model(path: str, tokens: int, draft_vocab: int, rates: list[float]) -> dict:
    model = qwen35.load_model(path, dtype=torch.bfloat16, kernels=True)
    V = model.config.vocab_size
    prompt = torch.randint(0, 240000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    params = qwen35.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    decode_rate(model, prompt[:8], qwen35.SamplingParams(temperature=0, max_tokens=8), Speculation(draft_tokens=2))
    plain, ref = decode_rate(model, prompt, params)
    plains = [plain]
    out = {"plain_tok_s": round(plain, 2), "runs": []}
    print(f"\n0.8B shape ({path}, bf16, kernels), {tokens} tokens: plain decode {plain:.2f} tok/s; each drafting run "
          "is compared with a plain run just before it (A/B alternated: this machine's speed drifts by ~10%)")
    print(f"{'vocab':>8}{'k':>3}" + "".join(f"{f'r={r:.1f}':>9}" for r in rates) + f"{'round ms':>10}{'in steps':>10}{'break-even':>12}")
    for vocab in (None, draft_vocab):
        for k in (1, 2, 3, 4):
            line, round_s = [], []
            for r in rates:
                plain = decode_rate(model, prompt, params)[0]
                plains.append(plain)
                spec = Speculation(draft_tokens=k, draft_vocab=vocab, propose=corrupted(ref, r, V, 1))
                rate, toks = decode_rate(model, prompt, params, spec)
                assert toks == ref, "the corrupted source changed the output"
                st = spec.stats
                round_s.append((len(toks) - 1) / rate / max(st.rounds, 1) * plain)  # in plain steps; no prefill
                line.append(rate / plain)
                out["runs"].append({"vocab": vocab or V, "k": k, "r": r, "tok_s": round(rate, 2),
                                    "plain_tok_s": round(plain, 2), "speedup": round(rate / plain, 3),
                                    "acceptance": [round(a, 3) for a in st.acceptance]})
            # break-even: the acceptance a where 1 + a + ... + a^k tokens per round pay for the round
            ratio = sorted(round_s)[len(round_s) // 2]
            t_round = ratio / plain
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if expected_tokens([mid] * k, k) >= ratio else (mid, hi)
            be = hi if expected_tokens([1.0] * k, k) >= ratio else None
            out["runs"].append({"vocab": vocab or V, "k": k, "round_ms": round(t_round * 1e3, 2),
                                "round_in_decode_steps": round(ratio, 3), "break_even": None if be is None else round(be, 3)})
            print(f"{vocab or V:>8}{k:>3}" + "".join(f"{x:>8.2f}x" for x in line)
                  + f"{t_round * 1e3:>10.1f}{ratio:>10.2f}{'never' if be is None else f'{be:.2f}':>12}")
    plain = sorted(plains)[len(plains) // 2]
    out["plain_tok_s_median"], out["plain_tok_s_range"] = round(plain, 2), [round(min(plains), 2), round(max(plains), 2)]
    print(f"plain decode over the run: median {plain:.2f} tok/s, range {min(plains):.2f}-{max(plains):.2f}")
    out["rollback"] = rollback_cost(model, prompt, plain)
    print(f"rollback (rewind of a 5-token verify + MTP truncate): {out['rollback']['ms']:.3f} ms = "
          f"{out['rollback']['fraction_of_decode_step']:.2%} of a decode step")
    return out


def rollback_cost(model, prompt, plain_tok_s: float) -> dict:
    cache, mcache = model.make_cache(), model.make_mtp_cache()
    with torch.no_grad():
        h = model.hidden_states(torch.tensor([prompt]), cache)
        model.mtp_forward(h[:, :-1], torch.tensor([prompt[1:]]), mcache, logits=False)
        times = []
        for _ in range(20):
            cache.keep_steps(True)
            model.hidden_states(torch.tensor([prompt[:5]]), cache)
            mlen = mcache.lengths
            model.mtp_forward(h[:, -1:], torch.tensor([[1]]), mcache, logits=False)
            t0 = time.perf_counter()
            cache.rewind([1])
            mcache.truncate(mlen)
            times.append(time.perf_counter() - t0)
            cache.keep_steps(False)
    ms = sorted(times)[len(times) // 2] * 1e3
    return {"ms": round(ms, 4), "fraction_of_decode_step": round(ms / 1e3 * plain_tok_s, 5)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replica", default="benchmarks/.cache/replica-0.8b")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--draft-vocab", type=int, default=32768)
    ap.add_argument("--bundled-draft-vocab", type=int, default=2048)
    ap.add_argument("--rates", default="0.5,0.7,0.9")
    ap.add_argument("--skip-bundled", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {torch.get_num_threads()} threads")
    res = {"load_average": [round(x, 2) for x in load]}
    if not args.skip_bundled:
        res["bundled"] = bundled(args.tokens, args.bundled_draft_vocab)
        res["prefix_context"] = prefix_context()
    if Path(args.replica).is_dir():
        res["cost_model_0.8b"] = cost_model(args.replica, args.tokens, args.draft_vocab,
                                            [float(r) for r in args.rates.split(",")])
    else:
        print(f"no replica at {args.replica} (qwen35 replica {args.replica}): cost model skipped")
    res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
