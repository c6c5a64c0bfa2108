"""Quantized weights: quality (KL against the unquantized model's fp32 logits) per policy and per tensor
class, and speed (prefill, decode, fraction of the memory-read bound) side by side with bf16.

Quality runs on the bundled model (trained, so its next-token distributions mean something) over held-out
text: every 20th file of the Python standard library, the split its training left out. Each tensor class is
also quantized alone to q4_0 (everything else unquantized), which is how the int4 policy was chosen.
Speed runs `qwen35 bench` on the Qwen3.5-0.8B-shape replica for bf16, q8_0 and int4, each in its own process.
llama.cpp is not run yet (building llama-cpp-python from source is the GGUF issue's); its numbers from the
issue are quoted in the README instead. Prints tables, then one JSON line.

    python benchmarks/bench_quant.py [--rows 48] [--skip-speed]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPLICA = HERE / ".cache" / "replica-0.8b"

CLASSES = {  # name -> a predicate on parameter names
    "mlp": lambda n: ".mlp." in n,
    "attention q/k/v/o": lambda n: ".self_attn." in n,
    "deltanet in_proj_qkv/z": lambda n: n.endswith(("in_proj_qkv.weight", "in_proj_z.weight")),
    "deltanet in_proj_a/b (gates)": lambda n: n.endswith(("in_proj_a.weight", "in_proj_b.weight")),
    "deltanet out_proj": lambda n: n.endswith("linear_attn.out_proj.weight"),
    "embedding + head (tied)": lambda n: n in ("model.embed_tokens.weight", "lm_head.weight"),
}


def heldout_rows(tok, rows: int, T: int = 256) -> torch.Tensor:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    ids = []
    for f in files[::20]:
        ids += tok.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= rows * T:
            break
    return torch.tensor(ids[: rows * T]).reshape(-1, T)


def kl_stats(ref_logp: torch.Tensor, model, ids: torch.Tensor) -> tuple[float, float]:
    kls, agree = [], []
    with torch.no_grad():
        for i in range(0, ids.shape[0], 8):
            lq = model(ids[i : i + 8]).float().log_softmax(-1)
            lp = ref_logp[i : i + 8]
            kls.append((lp.exp() * (lp - lq)).sum(-1).flatten())
            agree.append((lp.argmax(-1) == lq.argmax(-1)).flatten().float())
    return torch.cat(kls).mean().item(), torch.cat(agree).mean().item()


def quality(rows: int) -> dict:
    import qwen35
    from qwen35.commands.common import default_model
    from qwen35.quant import policy

    path = default_model()
    ref, tok = qwen35.load(path, dtype=torch.float32, kernels=False)
    ids = heldout_rows(tok, rows)
    with torch.no_grad():
        ref_logp = torch.cat([ref(ids[i : i + 8]).log_softmax(-1) for i in range(0, ids.shape[0], 8)])
    shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    out = {"tokens": ids.numel(), "policies": {}, "classes": {}}
    runs = [("bf16 (unquantized)", None)] + [(p, p) for p in ("q8_0", "int4", "q4_0")]
    for label, quant in runs:
        m = qwen35.load_model(path, dtype=torch.bfloat16, quant=quant)
        kl, agree = kl_stats(ref_logp, m, ids)
        plan = policy.plan(quant, shapes, ref.config.tie_word_embeddings) if quant else {}
        out["policies"][label] = {"kl": kl, "greedy_agreement": agree, "bpw": policy.bits_per_weight(plan, shapes)}
    for label, pred in CLASSES.items():
        m = qwen35.load_model(path, dtype=torch.bfloat16, quant=lambda n, s, t, pred=pred: "q4_0" if pred(n) else None)
        kl, agree = kl_stats(ref_logp, m, ids)
        out["classes"][label] = {"kl": kl, "greedy_agreement": agree}
    return out


def speed() -> dict:
    if not (REPLICA / "config.json").is_file():
        from qwen35.commands.replica import build_replica

        build_replica(REPLICA, "0.8b")
    out = {}
    for label, extra in (("bf16", []), ("q8_0", ["--quant", "q8_0"]), ("int4", ["--quant", "int4"])):
        r = subprocess.run([sys.executable, "-m", "qwen35", "bench", str(REPLICA), "--prompt-tokens", "512",
                            "--gen-tokens", "64", "--json", *extra], capture_output=True, text=True)
        out[label] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-300:]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48, help="held-out rows of 256 tokens")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    q = quality(args.rows)
    print(f"quality on the bundled model, {q['tokens']} held-out tokens (KL vs fp32 unquantized)")
    print(f"{'policy':<28}{'bits/weight':>12}{'mean KL':>12}{'greedy agree':>14}")
    for k, v in q["policies"].items():
        print(f"{k:<28}{v['bpw']:>12.2f}{v['kl']:>12.5f}{v['greedy_agreement']:>14.3f}")
    print(f"\n{'q4_0 on one class only':<28}{'mean KL':>12}{'greedy agree':>14}")
    for k, v in q["classes"].items():
        print(f"{k:<28}{v['kl']:>12.5f}{v['greedy_agreement']:>14.3f}")
    result = {"bench": "quant", "quality": q}
    if not args.skip_speed:
        s = speed()
        print(f"\nspeed on the 0.8B replica\n{'weights':<10}{'MiB/token':>10}{'prefill@512':>13}{'decode':>9}"
              f"{'bound':>8}{'efficiency':>12}{'peak MiB':>10}")
        for k, v in s.items():
            if "error" in v:
                print(f"{k:<10}failed: {v['error']}")
                continue
            print(f"{k:<10}{v['bytes_per_token_mb']:>10.0f}{v['prefill_tok_s']:>13.1f}{v['decode_tok_s']:>9.2f}"
                  f"{v['decode_bound_tok_s']:>8.1f}{v['decode_efficiency']:>12.1%}{v['peak_rss_mb']:>10.0f}")
        result["speed"] = s
    print(json.dumps(result))


if __name__ == "__main__":
    main()
