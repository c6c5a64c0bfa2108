"""Our GGUF writer and reader against llama.cpp itself (its converter's files and its runtime).

1. replica-0.8b (a Qwen3.5-0.8B-shaped checkpoint, random weights, real tokenizer): our bf16 export vs the
   file llama.cpp's converter made from it: every metadata key and value, tensor name, shape, type, and the
   tensor bytes themselves.
2. llama.cpp's file loaded in qwen35: the same weights and logits as the HF checkpoint loaded in qwen35.
3. llama.cpp (llama-cpp-python, in its own venv) runs OUR exports: its logits vs qwen35's on the same file,
   for replica-0.8b and for a small replica with Hv = 2 Hk (where llama.cpp's value-head reorder matters and
   no converter file exists), in bf16, q8_0 and q4_0.
4. The bundled model exported with its tokenizer: llama.cpp tokenizes texts as qwen35 does, and 32 greedy
   tokens agree.

    python benchmarks/check_gguf_vs_llamacpp.py [--skip-0.8b]
    python benchmarks/check_gguf_vs_llamacpp.py --write-manifest   # tests/llamacpp_0.8b_manifest.json

Prints a table and a final JSON line. Needs benchmarks/.cache/replica-0.8b-tok (`qwen35 replica`); builds
llama-cpp-python and llama.cpp's GGUFs through benchmarks/llamacpp.py where they are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
sys.path.insert(0, str(HERE))
import llamacpp  # noqa: E402  the one place that builds llama-cpp-python (and makes its GGUFs)
TEXTS = ["Hello, world! How are you today?", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n",
         "naïve café — 東京 🙂 1234567", "   spaces\t\ttabs\n\n\nnewlines"]


# ---- worker side: runs in the llama.cpp venv; imports nothing of qwen35 ----
def _llama(gguf: str, n_ctx: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=gguf, n_ctx=n_ctx, n_batch=512, n_threads=2, n_threads_batch=2,
                 logits_all=logits_all, verbose=False)


def _w_logits(gguf: str, ids_json: str, out: str) -> dict:
    import numpy as np

    rows = json.loads(ids_json)
    llm = _llama(gguf, max(len(r) for r in rows) + 8, logits_all=True)
    res = []
    for r in rows:
        llm.reset()
        llm.eval(r)
        res.append(np.array(llm.scores[: len(r)], dtype=np.float32))
    np.save(out, np.stack(res))
    return {"out": out}


def _w_tokens(gguf: str, texts_json: str, n_gen: str) -> dict:
    import numpy as np

    llm = _llama(gguf, 256)
    texts = json.loads(texts_json)
    toks = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    llm.reset()
    llm.eval(toks[0])
    greedy = []
    for _ in range(int(n_gen)):
        import llama_cpp

        z = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        t = int(z.argmax())
        greedy.append(t)
        llm.eval([t])
    return {"tokens": toks, "greedy": greedy}


WORKERS = {"logits": _w_logits, "tokens": _w_tokens}


def worker(*args: str) -> dict:
    r = subprocess.run([str(llamacpp.venv_python()), __file__, "worker", *args], capture_output=True, text=True, check=False)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"llama.cpp worker {args[0]} failed (rc {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(lines[-1])


# ---- parent side ----
def llama_logits(gguf: Path, rows: list[list[int]], work: Path):
    import numpy as np
    import torch

    out = work / f"{gguf.stem}-logits.npy"
    worker("logits", str(gguf), json.dumps(rows), str(out))
    return torch.from_numpy(np.load(out))


def ours_logits(model, rows):
    import torch

    with torch.no_grad():
        return torch.stack([model(torch.tensor([r]))[0].float() for r in rows])


def compare(a, b) -> dict:
    """Max |difference| of log-probs and top-1 agreement over all positions."""
    la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
    return {"max_dlogprob": round(float((la - lb).abs().max()), 4),
            "top1_agree": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4)}


def bytes_equal(ours: Path, theirs: Path) -> tuple[int, list[str]]:
    import numpy as np

    from qwen35.gguf import open_gguf

    a, b = open_gguf(ours), open_gguf(theirs)
    differ = [n for n, t in a.tensors.items() if n in b.tensors and not np.array_equal(t.data, b.tensors[n].data)]
    return len(a.tensors), differ


def check_0_8b(work: Path, rows: list[list[int]], table: list, result: dict) -> None:
    import torch

    import qwen35
    from qwen35.gguf import export_gguf, open_gguf
    from qwen35.gguf.compare import diff_gguf

    src = CACHE / "replica-0.8b-tok"
    made = llamacpp.made_ggufs(src, "replica-0.8b", ("q8_0",))
    theirs = made["bf16"]
    t0 = time.perf_counter()
    model = qwen35.load_model(src, dtype=torch.bfloat16, kernels=False)
    ours = work / "replica-0.8b-bf16.gguf"
    export_gguf(model, ours, "bf16", tokenizer_from=src, name="replica-0.8b")
    # ours always lists which layers are recurrent; llama.cpp's converter only when config.json spells out
    # layer_types (the replica's gives full_attention_interval): that key is no difference in the weights
    diffs = [d for d in diff_gguf(open_gguf(ours), open_gguf(theirs))
             if not d.startswith("key qwen35.attention.recurrent_layers: only ours")]
    n, differ = bytes_equal(ours, theirs)
    table.append(("0.8b export vs llama.cpp converter: metadata/tensor differences", len(diffs)))
    table.append(("0.8b export vs llama.cpp converter: tensors with different bytes", f"{len(differ)} of {n}"))
    result["0.8b_export"] = {"differences": diffs, "tensors": n, "bytes_differ": differ,
                             "seconds": round(time.perf_counter() - t0, 1)}

    ref = ours_logits(model, rows)
    theirs_model = qwen35.load_model(theirs, dtype=torch.bfloat16, kernels=False)
    c = ours_logits(theirs_model, rows)
    exact = bool(torch.equal(ref, c))
    table.append(("0.8b: llama.cpp's GGUF in qwen35 vs HF replica in qwen35: logits equal", exact))
    result["0.8b_llamacpp_file_in_qwen35"] = {"exact": exact, **compare(c, ref)}
    del theirs_model

    # llama.cpp's own q8_0 file: its blocks load as they are, and are the bytes our quantizer writes
    t0 = time.perf_counter()
    q8 = qwen35.load_model(made["q8_0"], dtype=torch.bfloat16, kernels=False)
    load_s = time.perf_counter() - t0
    mine = qwen35.load_model(src, dtype=torch.bfloat16, kernels=False, quant="q8_0")
    exact = bool(torch.equal(ours_logits(q8, rows), ours_logits(mine, rows)))
    table.append(("0.8b: llama.cpp's q8_0 GGUF in qwen35 == qwen35 quant=q8_0 (logits)", exact))
    table.append(("0.8b: load_model(llama.cpp's q8_0 GGUF) seconds", round(load_s, 1)))
    result["0.8b_llamacpp_q8_0_in_qwen35"] = {"exact": exact, "load_s": round(load_s, 1)}
    del q8, mine

    lc = llama_logits(ours, rows, work)
    cmp = compare(lc, ref)
    table.append(("0.8b: llama.cpp on our bf16 GGUF vs qwen35 (bf16)", cmp))
    result["0.8b_llamacpp_on_ours_bf16"] = cmp
    lt = llama_logits(theirs, rows, work)
    cmp = compare(lt, ref)
    table.append(("0.8b: llama.cpp on its own bf16 GGUF vs qwen35 (baseline)", cmp))
    result["0.8b_llamacpp_on_theirs_bf16"] = cmp


def check_small(work: Path, rows: list[list[int]], table: list, result: dict) -> None:
    import torch

    import qwen35
    from qwen35.commands.common import default_model
    from qwen35.commands.replica import build_replica
    from qwen35.gguf import export_gguf

    src = work / "small"  # the bundled model's tokenizer (8192 ids): llama.cpp will not load a GGUF without one
    build_replica(src, "tiny", layers=8, seed=11, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=64, linear_value_head_dim=64, vocab_size=8192, tie_word_embeddings=False)
    rows = [[t % 8192 for t in r] for r in rows]
    for kind in ("bf16", "q8_0", "q4_0"):
        quant = None if kind == "bf16" else kind
        model = qwen35.load_model(src, dtype=torch.bfloat16, kernels=False, quant=quant)
        out = work / f"small-{kind}.gguf"
        export_gguf(model, out, kind, tokenizer_from=Path(default_model()))
        cmp = compare(llama_logits(out, rows, work), ours_logits(model, rows))
        table.append((f"Hv=2Hk replica: llama.cpp on our {kind} GGUF vs qwen35 {kind}", cmp))
        result[f"small_{kind}"] = cmp
    # control: the same export with llama.cpp's value-head reorder left out must be visibly worse
    from unittest import mock

    from qwen35.gguf import names

    model = qwen35.load_model(src, dtype=torch.bfloat16, kernels=False)
    out = work / "small-unordered.gguf"
    with mock.patch.object(names, "row_index", lambda *a: None), mock.patch.object(names, "col_index", lambda *a: None):
        export_gguf(model, out, "bf16", tokenizer_from=Path(default_model()))
    cmp = compare(llama_logits(out, rows, work), ours_logits(model, rows))
    table.append(("control: same bf16 export WITHOUT the value-head reorder", cmp))
    result["small_control_no_reorder"] = cmp


def check_bundled(work: Path, table: list, result: dict) -> None:
    import torch

    import qwen35
    from qwen35.commands.common import default_model
    from qwen35.gguf import export_gguf
    from qwen35.sampling import SamplingParams

    src = Path(default_model())
    model, tok = qwen35.load(src, dtype=torch.bfloat16, kernels=False)
    out = work / "bundled-bf16.gguf"
    export_gguf(model, out, "bf16", tokenizer_from=src, name="model")
    n = 32
    r = worker("tokens", str(out), json.dumps(TEXTS), str(n))
    same = [r["tokens"][i] == tok.encode(t) for i, t in enumerate(TEXTS)]
    model2, tok2 = qwen35.load(out, dtype=torch.bfloat16, kernels=False)
    from qwen35.generation import generate_step

    params = SamplingParams(temperature=0.0, max_tokens=n)
    ours = [s.token for s in generate_step(model2, tok2.encode(TEXTS[0]), params=params)]
    agree = next((i for i, (a, b) in enumerate(zip(ours, r["greedy"])) if a != b), min(len(ours), n))
    table.append(("bundled: llama.cpp tokenizes like qwen35 (texts)", f"{sum(same)} of {len(same)}"))
    table.append(("bundled: greedy tokens agreeing (from the start)", f"{agree} of {n}"))
    result["bundled"] = {"tokenize_same": same, "greedy_agree": agree, "ours": ours, "llamacpp": r["greedy"]}


MANIFEST = HERE.parent / "tests" / "llamacpp_0.8b_manifest.json"


def write_manifest() -> None:
    """tests/llamacpp_0.8b_manifest.json: the tensor names, GGUF shapes and types of llama.cpp's bf16 and
    q8_0 files of replica-0.8b and their hyperparameter keys, so a unit test can hold our writer's plan to
    them without the 1.5 GB files."""
    from qwen35.gguf import open_gguf

    out = {}
    for kind in ("bf16", "q8_0"):
        f = open_gguf(llamacpp.made_ggufs(CACHE / "replica-0.8b-tok", "replica-0.8b", ("q8_0",))[kind])
        out[kind] = {n: [t.tensor_type.name, [int(x) for x in t.shape]] for n, t in f.tensors.items()}
        if kind == "bf16":
            out["metadata"] = {k: v for k, v in f.fields.items() if k.startswith("qwen35.")}
    lines = ["{"]
    for i, (section, items) in enumerate(sorted(out.items())):
        lines.append(f" {json.dumps(section)}: {{")
        rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(items.items())]
        lines.append(",\n".join(rows))
        lines.append(" }" + ("," if i < len(out) - 1 else ""))
    MANIFEST.write_text("\n".join(lines + ["}"]) + "\n")  # one tensor per line
    print(f"wrote {MANIFEST}")


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        print(json.dumps(WORKERS[sys.argv[2]](*sys.argv[3:])))
        return
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-0.8b", dest="skip", action="store_true", help="leave out the replica-0.8b checks")
    parser.add_argument("--write-manifest", action="store_true",
                        help="write tests/llamacpp_0.8b_manifest.json and stop")
    args = parser.parse_args()
    if args.write_manifest:
        write_manifest()
        return
    import torch

    torch.set_num_threads(2)
    llamacpp.ensure_installed()
    table: list = []
    result: dict = {}
    rows = [[9707, 11, 1879, 0, 2585, 525, 498, 3351, 30, 576, 374, 264, 1273, 13, 220, 16],
            [750, 16122, 1445, 982, 262, 470, 308, 421, 308, 366, 220, 17, 770, 16122, 1445, 481]]
    CACHE.mkdir(parents=True, exist_ok=True)  # (a fresh checkout has none yet)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        if not args.skip:
            check_0_8b(work, rows, table, result)
        check_small(work, rows, table, result)
        check_bundled(work, table, result)
    w = max(len(k) for k, _ in table)
    for k, v in table:
        print(f"{k:<{w}}  {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
