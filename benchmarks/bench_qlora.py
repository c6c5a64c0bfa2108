"""QLoRA: memory and step time of LoRA on a 4-bit base (4B and 9B shapes), and its quality on the bundled model.

Memory (issue 19's target: peak RSS <= RSS before loading + 1.3 x (quantized weights + adapters + optimizer
state), so the 9B trains in 16 GB). Each shape runs in a fresh subprocess (this file with --worker) doing
what `qwen35 train --init-from REPLICA --quant int4 --lora-rank 8 --bf16 --seq-len 1024 --batch-size 1`
does: load_model(replica, dtype=bfloat16, quant="int4") quantizing the bf16 replica tensor by tensor, adapters
on every default target (fused groups included, MTP layer included), then the training loop (AdamW, bf16
autocast, gradient checkpointing on: the default for a quantized base, MTP loss at its default weight) on
random token rows. "before" is VmRSS once torch, qwen35 and the C++ kernels are loaded; peaks are VmHWM
(reset after the load, so load and training peaks are reported apart). The denominator counts every weight
of `model.named_weights()` (packed matrices, kept bf16/fp32 tensors) plus the adapters with their gradients
and AdamW's two moments (4 x the adapters' fp32 bytes). Seconds per step: the steps after the first.

Quality (--quality): `qwen35 train` on the bundled model, the same data, steps, rank and seed, once on its bf16
weights (`--lora-rank R --bf16`) and once on the int4-quantized base (`--quant int4 --lora-rank R --bf16`);
target: the int4 run's eval loss within 2% of the bf16 run's. Data: Python standard-library files (the bundled
model's pretraining domain), one package for training and held-out files for the eval loss.

Replicas (random bf16 weights, official layout) are built into benchmarks/.cache on first use
(bench_quant_memory.replica). Delete them after (the 9B is 19 GB).

    python benchmarks/bench_qlora.py [--shapes 4b,9b] [--seq-len 1024] [--steps 3] [--quality] [--no-memory]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = 1.3
RANK = 8


def worker(path: str, seq_len: int, steps: int) -> dict:
    import llamacpp  # beside this file: load_mark / others_cores
    import torch
    from bench_quant_memory import reset_peak, status

    import qwen35
    from qwen35.ops import kernels
    from qwen35.quant.weight import QuantizedWeight
    from qwen35.runtime import set_threads, tune_allocator
    from qwen35.train.data import PackedRow
    from qwen35.train.loop import TrainConfig, train
    from qwen35.train.lora import apply_lora

    threads = set_threads(None)
    tune_allocator(training=True)  # as `qwen35 train` does
    kernels.available()
    before = status()
    t0 = time.perf_counter()
    model = qwen35.load_model(path, dtype=torch.bfloat16, quant="int4")
    load_s = time.perf_counter() - t0
    loaded = status()
    reset_peak()
    weights = sum(w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
                  for _, w in model.named_weights())
    names = apply_lora(model, RANK)
    adapters = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    gen = torch.Generator().manual_seed(0)
    rows = [PackedRow(ids, ids.clone(), torch.zeros_like(ids))
            for ids in torch.randint(0, 248044, (steps, seq_len), generator=gen)]
    cfg = TrainConfig(steps=steps, seq_len=seq_len, batch_size=1, lr=1e-4, warmup=1, bf16=True,
                      grad_checkpoint=True)
    stamps = []
    mark = llamacpp.load_mark()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        losses = train(model, rows, cfg, out, log=lambda s: stamps.append(time.perf_counter()))
    others = llamacpp.others_cores(mark)
    trained = status()
    steps_s = [b - a for a, b in zip([t0, *stamps[:-1]], stamps)]
    peak = max(loaded["VmHWM"], trained["VmHWM"])
    state = weights + 4 * adapters
    return {
        "model": path, "threads": threads, "seq_len": seq_len, "steps": steps, "adapters": len(names),
        "load_s": round(load_s, 1), "before_mb": round(before["VmRSS"], 1), "load_peak_mb": round(loaded["VmHWM"], 1),
        "train_peak_mb": round(trained["VmHWM"], 1), "peak_mb": round(peak, 1),
        "weights_mb": round(weights / 2**20, 1), "adapters_mb": round(adapters / 2**20, 1),
        "ratio": round((peak - before["VmRSS"]) * 2**20 / state, 3), "first_step_s": round(steps_s[0], 1),
        "step_s": round(sum(steps_s[1:]) / max(1, len(steps_s) - 1), 1), "losses": [round(x, 4) for x in losses],
        "others_cores": others,
    }


def run_worker(path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(path), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": f"{HERE}:{HERE.parent}"})
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def quality(args) -> dict:
    """Eval loss after the same LoRA fine-tune on the bf16 and the int4 base of the bundled model."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    train_files = sorted(str(p) for p in (lib / "asyncio").glob("*.py"))
    eval_files, train_files = train_files[::5], [f for i, f in enumerate(train_files) if i % 5]
    model = HERE.parent / "qwen35" / "assets" / "model"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("bf16 base", []), ("int4 base", ["--quant", "int4"])):
            cmd = [sys.executable, "-m", "qwen35", "train", "--init-from", str(model), "--data", *train_files,
                   "--eval-data", *eval_files, "--out", f"{tmp}/{label[:4]}", "--steps", str(args.quality_steps),
                   "--seq-len", "128", "--batch-size", "2", "--lr", "2e-3", "--warmup", "3", "--lora-rank", str(RANK),
                   "--bf16", "--log-every", "5", "--threads", str(args.quality_threads), *extra]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, check=False,
                               env={**os.environ, "PYTHONPATH": str(HERE.parent)})
            if r.returncode != 0:
                out[label] = {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
                continue
            losses = [float(m) for m in re.findall(r"step \d+/\d+ loss=([0-9.]+)", r.stdout)]
            out[label] = {"eval_loss": float(re.search(r"eval loss=([0-9.]+)", r.stdout).group(1)),
                          "train_loss_first": losses[0], "train_loss_last": losses[-1],
                          "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4b,9b")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quality", action="store_true", help="also the bundled-model eval-loss comparison")
    ap.add_argument("--quality-steps", type=int, default=40)
    ap.add_argument("--quality-threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the 4B/9B memory runs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq_len, args.steps)))
        return
    load = os.getloadavg()
    qual = quality(args) if args.quality else None
    rows = {}
    if not args.no_memory:
        sys.path.insert(0, str(HERE))
        from bench_quant_memory import replica

        for shape in args.shapes.split(","):
            rows[f"{shape} int4 + LoRA r{RANK}"] = run_worker(replica(shape), args)
    if qual is not None:
        print(f"bundled model, LoRA rank {RANK}, {args.quality_steps} steps x 2 rows x 128 tokens, bf16 autocast")
        print(f"{'base':<12}{'eval loss':>10}{'train first':>13}{'train last':>12}{'seconds':>9}")
        for k, v in qual.items():
            if "error" in v:
                print(f"{k:<12}failed: {v['error']}")
                continue
            print(f"{k:<12}{v['eval_loss']:>10.4f}{v['train_loss_first']:>13.4f}{v['train_loss_last']:>12.4f}"
                  f"{v['seconds']:>9.0f}")
        if all("eval_loss" in v for v in qual.values()):
            rel = qual["int4 base"]["eval_loss"] / qual["bf16 base"]["eval_loss"] - 1
            qual["relative"] = round(rel, 4)
            print(f"int4 eval loss vs bf16: {100 * rel:+.2f}% (target within 2%)\n")
    if rows:
        print(f"peak RSS vs RSS before loading + {TARGET} x (weights + adapters, grads, AdamW state); int4 base, "
              f"LoRA rank {RANK}, seq {args.seq_len}, batch 1, grad checkpointing, bf16 autocast")
        print(f"{'case':<22}{'load s':>8}{'before':>8}{'weights':>9}{'adapt':>7}{'load pk':>9}{'train pk':>10}"
              f"{'ratio':>7}{'1st step':>10}{'s/step':>8}{'others':>8}")
        for k, v in rows.items():
            if "error" in v:
                print(f"{k:<22}failed: {v['error']}")
                continue
            print(f"{k:<22}{v['load_s']:>8.1f}{v['before_mb']:>8.0f}{v['weights_mb']:>9.0f}{v['adapters_mb']:>7.0f}"
                  f"{v['load_peak_mb']:>9.0f}{v['train_peak_mb']:>10.0f}{v['ratio']:>7.3f}{v['first_step_s']:>10.1f}"
                  f"{v['step_s']:>8.1f}{v['others_cores']:>8.2f}")
        print(f"MiB; ratio = (peak - before) / (weights + 4 x adapters), target <= {TARGET}; s/step: the steps after "
              "the first (2 threads); others: cores' worth of CPU other processes used meanwhile")
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; at end: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(json.dumps({"bench": "qlora", "target": TARGET, "quality": qual, "rows": rows, "load_avg": load}))


if __name__ == "__main__":
    main()
