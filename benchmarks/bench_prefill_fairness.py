"""A long prompt must not hold the server: time to first token of short requests while a ~12K-token prompt
prefills, and how soon a prefill whose client went away stops (issue 18's head-of-line blocking).

Runs `qwen35 serve` on the Qwen3.5-0.8B-shape replica (bf16, random weights, the Qwen3.5 tokenizer; as
bench_server.py), for this checkout and, with --baseline REV, for REV beside it in the same run.

Phase "beside": one client streams a long prompt; once the server has started on it (1 s), `--shorts`
short requests (about 30 prompt tokens, 8 generated) are sent one after another; each one's TTFT, and
the long request's own TTFT, are recorded.
Phase "abandoned": a client sends the long prompt and disconnects after 2 s; then one short request is
sent: its TTFT is how long the abandoned prefill kept the server busy.

    python benchmarks/bench_prefill_fairness.py [--long-tokens 12000] [--shorts 3] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from pathlib import Path

from baseline import checkout
from bench_server import prepare, start, stream_once, words


def long_text(model: Path, tokens: int, seed: int) -> str:
    from qwen35.tokenizer import Tokenizer

    tok = Tokenizer(model)
    per_word = len(tok.encode(words(random.Random(8), 1000))) / 1000
    return words(random.Random(seed), int(tokens / per_word))


def phases(model: Path, text: str, other: str, args, code: Path | None = None) -> dict:
    """text: the long prompt beside the short ones; other: the abandoned one (a different text, so the
    prompt cache cannot answer it from the first phase's snapshot)."""
    from openai import OpenAI

    proc, base = start(model, ["--max-batch", "8"], code)
    out: dict = {}
    try:
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=3600)
        stream_once(client, [{"role": "user", "content": "warm up"}], 4)
        r = random.Random(0)
        shorts = [[{"role": "user", "content": f"{i} " + words(r, 25)}] for i in range(args.shorts)]

        # beside: short requests while the long prompt prefills
        got: dict = {}
        t0 = time.perf_counter()
        th = threading.Thread(target=lambda: got.update(stream_once(
            client, [{"role": "user", "content": text}], 4)), daemon=True)
        th.start()
        time.sleep(1.0)
        ttfts = [round(stream_once(client, m, 8)["ttft"], 2) for m in shorts]
        th.join()
        out["beside"] = {"short_ttft_s": ttfts, "long_ttft_s": round(got["ttft"], 2),
                         "long_prompt_tokens": got["prompt"], "wall_s": round(time.perf_counter() - t0, 1)}

        # abandoned: the client of a long prompt goes away after 2 s
        def abandon():
            try:
                with client.chat.completions.with_streaming_response.create(
                        model="m", messages=[{"role": "user", "content": other}], max_tokens=4, stream=True,
                        timeout=2.0) as resp:
                    for _ in resp.iter_lines():
                        pass
            except Exception:  # noqa: BLE001 - the timeout is the point: the client leaves
                pass

        abandon()
        out["abandoned"] = {"next_short_ttft_s": round(stream_once(client, shorts[0], 8)["ttft"], 2)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--long-tokens", type=int, default=12000)
    ap.add_argument("--shorts", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="also run at this git revision (before the change)")
    args = ap.parse_args()
    model = prepare(args.model)
    text, other = long_text(model, args.long_tokens, 9), long_text(model, args.long_tokens, 10)
    runs = {}
    if args.baseline:
        with checkout(args.baseline) as code:
            runs[f"qwen35@{args.baseline}"] = phases(model, text, other, args, code)
    runs["qwen35"] = phases(model, text, other, args)
    print(f"{'engine':<18}{'long prompt':>12}{'long TTFT s':>12}{'short TTFTs s (while long prefills)':>38}"
          f"{'after abandon s':>17}")
    for name, res in runs.items():
        b = res["beside"]
        print(f"{name:<18}{b['long_prompt_tokens']:>12}{b['long_ttft_s']:>12.1f}"
              f"{', '.join(f'{t:.2f}' for t in b['short_ttft_s']):>38}{res['abandoned']['next_short_ttft_s']:>17.2f}")
    print(json.dumps({"bench": "prefill_fairness", "model": str(model), "load_avg": os.getloadavg(), "runs": runs}))


if __name__ == "__main__":
    main()
