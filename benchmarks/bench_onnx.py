"""ONNX export speed: onnxruntime (CPU) on the exported Qwen3.5-0.8B-shape replica beside qwen35 on the same
weights, and the bundled model in the browser (onnxruntime-web WASM, headless Chromium) beside both.

Every engine runs in its own process (its peak RSS is its own), with the same thread count, a 512-token
random prompt in one prefill call and 32 greedy decode steps after it. qwen35 rows are `qwen35 bench`
(bf16 with its kernels, and --quant int8); onnxruntime rows run the export's prefill graph once over the
prompt and its decode graph per token (`OnnxModel`). The exports (fp32 and int8 from one torch export) are
cached in benchmarks/.cache/. The browser row needs Chromium and playwright-core (tests/browser_setup.py);
--no-browser skips it. Prints a table, then one JSON line. Record `uptime` beside the numbers (shared box).

    python benchmarks/bench_onnx.py [--model DIR] [--threads 2] [--no-browser]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
BUNDLED = ROOT / "qwen35" / "assets" / "model"
PROMPT, GEN = 512, 32


def _run_json(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def export(model: Path, out: Path, quants: tuple) -> dict[str, Path]:
    """{quant: export dir} (fp32 = None), exported once from one torch export (in a subprocess: the export's
    ~10 GB peak at 0.8B is then given back before anything is timed) and cached."""
    dirs = {q: out.with_name(f"{out.name}-{q or 'fp32'}") for q in quants}
    if any(not (d / "manifest.json").is_file() for d in dirs.values()):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, __file__, "_export", str(model), str(out), *(q or "fp32" for q in quants)],
                       check=True, env=env, cwd=ROOT)
    return dirs


def export_worker(model: Path, out: Path, quants: tuple) -> None:
    """(subprocess) the exports `export` asks for."""
    dirs = {q: out.with_name(f"{out.name}-{q or 'fp32'}") for q in quants}
    todo = [q for q, d in dirs.items() if not (d / "manifest.json").is_file()]
    if todo:
        import torch

        from qwen35.export.onnx import export_model
        from qwen35.weights import load_model

        t0 = time.perf_counter()
        m = load_model(model, dtype=torch.float32, kernels=False)
        # the tokenizer is the bundled one: timings never read it
        export_model(m, [(dirs[q], q, None) for q in todo], BUNDLED)
        print(f"exported {model} ({', '.join(q or 'fp32' for q in todo)}) in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr)


def ort_worker(path: str, threads: int) -> None:
    """(subprocess) onnxruntime prefill + decode timings of one export; prints one JSON line."""
    import numpy as np

    from qwen35.export.onnx_runtime import OnnxModel

    om = OnnxModel(path, threads=threads)
    vocab = om.manifest["vocab_size"]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, min(vocab, 248044), (1, PROMPT), dtype=np.int64)
    om.greedy(prompt[0, :8].tolist(), 4, stop=False)  # warm-up: first-run allocations and kernel setup
    t0 = time.perf_counter()
    logits, cache = om.prefill(prompt, chunk=PROMPT)
    t1 = time.perf_counter()
    tok = int(logits[0].argmax())
    for _ in range(GEN - 1):
        # through the prefill graph, as OnnxModel.greedy and the page do: one session, the weights held once
        logits, cache = om.step("prefill", np.array([[tok]], dtype=np.int64), cache)
        tok = int(logits[0].argmax())
    t2 = time.perf_counter()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak
    hwm = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
    print(json.dumps({"prefill_tok_s": PROMPT / (t1 - t0), "decode_tok_s": (GEN - 1) / (t2 - t1),
                      "peak_rss_mb": int(hwm.split()[1]) / 1024}))


def qwen35_bench(model: Path, threads: int, *extra: str) -> dict:
    r = _run_json([sys.executable, "-m", "qwen35", "bench", str(model), "--prompt-tokens", str(PROMPT),
                   "--gen-tokens", str(GEN), "--threads", str(threads), "--json", *extra])
    return {k: r[k] for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb")}


def ort_bench(path: Path, threads: int) -> dict:
    return _run_json([sys.executable, __file__, "_ort", str(path), str(threads)])


def browser_bench(site_model: Path) -> dict:
    """The bundled model's page in headless Chromium (WASM): prefill and decode tok/s it reports."""
    sys.path.insert(0, str(ROOT / "tests"))
    import browser_setup

    from qwen35.export.web import build_site, make_server

    driver = browser_setup.wait_install(browser_setup.start_install())
    site = build_site(site_model, CACHE / "web-bundled")
    server = make_server(site, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        r = subprocess.run(["node", str(ROOT / "tests" / "browser_chat.mjs"), str(driver), url,
                            "Write a long story about a dragon.", "64", str(CACHE / "web-bundled.png")],
                           capture_output=True, text=True, check=False, timeout=600)
    finally:
        server.shutdown()
    if r.returncode != 0:
        raise SystemExit(f"browser run failed:\n{r.stderr[-2000:]}")
    page = json.loads(r.stdout.strip().splitlines()[-1])
    return {"prefill_tok_s": page["prefillTokS"], "decode_tok_s": page["decodeTokS"],
            "prompt_tokens": page["promptTokens"], "backend": page["backend"], "load_s": page["loadMs"] / 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=CACHE / "replica-0.8b", help="0.8B-shape checkpoint")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-browser", action="store_true")
    args = p.parse_args()
    if not (args.model / "config.json").is_file():
        from qwen35.commands.replica import build_replica

        build_replica(args.model, "0.8b")
    rows = []
    dirs = export(args.model, CACHE / "onnx-0.8b", (None, "int8"))
    rows.append(("0.8B", "qwen35", "bf16", qwen35_bench(args.model, args.threads)))
    rows.append(("0.8B", "qwen35", "int8 (q8_0)", qwen35_bench(args.model, args.threads, "--quant", "int8")))
    rows.append(("0.8B", "onnxruntime CPU", "fp32", ort_bench(dirs[None], args.threads)))
    rows.append(("0.8B", "onnxruntime CPU", "int8 (MatMulNBits)", ort_bench(dirs["int8"], args.threads)))
    small = export(BUNDLED, CACHE / "onnx-bundled", ("int8",))["int8"]
    rows.append(("bundled", "qwen35", "int8 (q8_0)", qwen35_bench(BUNDLED, args.threads, "--quant", "int8")))
    rows.append(("bundled", "onnxruntime CPU", "int8 (MatMulNBits)", ort_bench(small, args.threads)))
    if not args.no_browser:
        rows.append(("bundled", "browser WASM", "int8 (MatMulNBits)", browser_bench(small)))
    load = os.getloadavg()
    print(f"{PROMPT}-token prompt, {GEN} decode steps, {args.threads} threads; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'model':<9}{'engine':<17}{'weights':<20}{'prefill tok/s':>14}{'decode tok/s':>14}{'peak RSS MiB':>14}")
    for model, engine, weights, r in rows:
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        print(f"{model:<9}{engine:<17}{weights:<20}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.2f}{rss:>14}")
    for model, engine, weights, r in rows:
        if "load_s" in r:
            print(f"{engine}: the page's chat prompt ({r['prompt_tokens']} tokens; its tok/s are what the page "
                  f"shows); page ready (wasm, weights, sessions) in {r['load_s']:.1f}s")
    print(json.dumps({"threads": args.threads, "prompt_tokens": PROMPT, "gen_tokens": GEN, "load_average": load,
                      "rows": [{"model": m, "engine": e, "weights": w, **{k: round(v, 2) if isinstance(v, float)
                                                                          else v for k, v in r.items()}}
                               for m, e, w, r in rows]}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_ort"]:
        sys.path.insert(0, str(ROOT))
        ort_worker(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["_export"]:
        sys.path.insert(0, str(ROOT))
        export_worker(Path(sys.argv[2]), Path(sys.argv[3]), tuple(None if q == "fp32" else q for q in sys.argv[4:]))
    else:
        sys.path.insert(0, str(ROOT))
        main()
