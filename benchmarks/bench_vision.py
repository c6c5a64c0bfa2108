"""Time to first token for a 1280x720 screenshot + a short question, qwen35 vs transformers, in one run.

The checkpoint is a 0.8B-shaped composite replica (random weights, official layout, BF16) with the vision
tower at the official 0.8B dimensions (12 blocks, 768 wide, 16 px patches): `qwen35 replica --vision`.
Each side runs in a fresh subprocess (its own peak RSS, VmHWM), loads the model, warms up once on a small
picture (allocator, kernels, thread pools), then answers the screenshot `--repeats` times; the best time is
reported (qwen35 with its thread governor, as `qwen35 serve` and the CLI run, unless --threads pins a count), split into preprocessing (decode, resize, patches), the vision encoder, and the language model's
prefill up to the first token (ttft = the three). Both sides get the same prompt ids and pixel values
(ours are bit-equal to transformers' processor: tests/test_vision.py).

    python benchmarks/bench_vision.py [--repeats 2] [--threads N] [--skip-transformers]

Prints a table (with the load average: compare sides within one run only), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"

CHILD = r"""
import io, json, sys, time
import numpy as np, torch
from PIL import Image

def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 1024

which, path, repeats, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
torch.set_grad_enabled(False)

def screenshot(w, h, seed=0):
    # flat panels, text-like stripes and noise: a PNG that decodes like a real screenshot
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, np.uint8)
    for _ in range(40):
        x, y = rng.integers(0, w - 40), rng.integers(0, h - 20)
        img[y:y + rng.integers(10, 200), x:x + rng.integers(20, 400)] = rng.integers(0, 256, 3)
    img[::7] = rng.integers(0, 256, (len(img[::7]), w, 3))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, 'PNG')
    return buf.getvalue()

PAD, START, END = 248056, 248053, 248054
QUESTION = [248045, 846, 198, START, PAD, END, 3838, 374, 389, 419, 4171, 30, 21806, 304, 825, 11652, 13,
            248046, 198, 248045, 74455, 198]  # <|im_start|>user\n<image>What is on this screen? ...

def prompt_ids(n_pad):
    i = QUESTION.index(PAD)
    return QUESTION[:i] + [PAD] * n_pad + QUESTION[i + 1:]

timings = []
if which == 'qwen35':
    import qwen35
    from qwen35 import threads as governor
    from qwen35.multimodal import VisionPrompt, prepare_prompt
    from qwen35.runtime import tune_allocator
    if not threads:  # as the CLI and the server run: threads per step adapt to a busy machine
        governor.enable()
    tune_allocator()
    model = qwen35.load_model(path, dtype=torch.bfloat16)
    tower = model.visual
    enc = []
    forward = tower.forward
    def timed(*a, **k):
        t = time.perf_counter(); out = forward(*a, **k); enc.append(time.perf_counter() - t); return out
    tower.forward = timed
    def answer(png):
        t0 = time.perf_counter()
        ids, inputs, _ = prepare_prompt(model, QUESTION, [png])
        t1 = time.perf_counter()
        cache = model.make_cache()
        logits = VisionPrompt.build(model, ids, inputs).prefill(model, cache, 512)
        tok = int(logits.argmax())
        t2 = time.perf_counter()
        return {"preprocess_s": t1 - t0, "encoder_s": enc[-1], "prefill_s": t2 - t1 - enc[-1], "ttft_s": t2 - t0,
                "prompt_tokens": len(ids), "patches": int(np.prod(inputs[0].grid)), "token": tok}
else:
    from transformers import Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    model = Qwen3_5ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    proc = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size={'shortest_edge': 65536, 'longest_edge': 16777216})
    enc = []
    visual = model.model.visual
    forward = visual.forward
    def timed(*a, **k):
        t = time.perf_counter(); out = forward(*a, **k); enc.append(time.perf_counter() - t); return out
    visual.forward = timed
    def answer(png):
        t0 = time.perf_counter()
        px = proc(images=[Image.open(io.BytesIO(png))], return_tensors='pt')
        grid = px['image_grid_thw']
        ids = torch.tensor([prompt_ids(int(grid.prod()) // 4)])
        t1 = time.perf_counter()
        out = model(ids, pixel_values=px['pixel_values'], image_grid_thw=grid,
                    mm_token_type_ids=(ids == PAD).int(), logits_to_keep=1, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        t2 = time.perf_counter()
        return {"preprocess_s": t1 - t0, "encoder_s": enc[-1], "prefill_s": t2 - t1 - enc[-1], "ttft_s": t2 - t0,
                "prompt_tokens": ids.shape[1], "patches": int(px['pixel_values'].shape[0]), "token": tok}

answer(screenshot(320, 240, 1))  # warm-up
png = screenshot(1280, 720)
runs = [answer(png) for _ in range(repeats)]
best = min(runs, key=lambda r: r["ttft_s"])
print(json.dumps({**best, "peak_rss_mb": hwm(), "threads": torch.get_num_threads()}))
"""


def run_child(which: str, path: Path, repeats: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(path), str(repeats), str(threads)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()

    from qwen35.commands.replica import build_replica

    path = CACHE / "replica-0.8b-vision"
    if not (path / "config.json").is_file():
        t0 = time.perf_counter()
        build_replica(path, "0.8b", vision=True)
        print(f"built the 0.8b vision replica in {time.perf_counter() - t0:.1f}s at {path}")
    load0 = os.getloadavg()[0]
    rows = {"qwen35": run_child("qwen35", path, args.repeats, args.threads)}
    if not args.skip_transformers:
        rows["transformers"] = run_child("transformers", path, args.repeats, args.threads)
    load1 = os.getloadavg()[0]

    print(f"\n1280x720 screenshot + question, 0.8B-shaped composite replica, bf16, best of {args.repeats}; "
          f"load average {load0:.2f} -> {load1:.2f}")
    print(f"{'runtime':<14}{'tokens':>8}{'patches':>9}{'preproc s':>11}{'encoder s':>11}{'prefill s':>11}"
          f"{'TTFT s':>9}{'peak RSS MiB':>14}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<14}  failed: {r['error']}")
            continue
        print(f"{name:<14}{r['prompt_tokens']:>8}{r['patches']:>9}{r['preprocess_s']:>11.2f}{r['encoder_s']:>11.2f}"
              f"{r['prefill_s']:>11.2f}{r['ttft_s']:>9.2f}{r['peak_rss_mb']:>14.0f}")
    q, t = rows["qwen35"], rows.get("transformers", {})
    speedup = t["ttft_s"] / q["ttft_s"] if "ttft_s" in q and "ttft_s" in t else None
    if speedup:
        print(f"TTFT speedup over transformers: {speedup:.2f}x (encoder {t['encoder_s'] / q['encoder_s']:.2f}x, "
              f"prefill {t['prefill_s'] / q['prefill_s']:.2f}x); same first token: {q['token'] == t['token']}")
    result = {"bench": "vision", "image": "1280x720", "load_avg": [round(load0, 2), round(load1, 2)],
              **{f"{k}_{m}": (round(v[m], 3) if isinstance(v.get(m), float) else v.get(m))
                 for k, v in rows.items() for m in ("ttft_s", "preprocess_s", "encoder_s", "prefill_s", "peak_rss_mb",
                                                    "prompt_tokens")},
              "ttft_speedup": round(speedup, 3) if speedup else None}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
