"""llama.cpp beside qwen35 on the same weights: install llama-cpp-python, convert an HF checkpoint to GGUF with
llama.cpp's own converter, quantize it, time it and read its logits.

llama.cpp lives in its own venv (~/.cache/qwen35/llamacpp/VERSION-KEY/venv, one per machine), never in
qwen35's environment: its converter pins its own transformers and numpy, and the benchmark must not change what
qwen35 is measured with. The build is from source with the SIMD level spelled out, because the default native
build died with an illegal instruction on some machines here, and pip's wheel cache ignores a changed CMAKE_ARGS
(hence --no-cache-dir).
It takes 10-15 minutes on 2 cores, so `start_install()` runs it in the background and `wait_install()` polls.

Everything that touches llama_cpp runs in that venv's python, through this same file's worker commands
(`convert`, `quantize`, `stats`, `time`, `logits`, `tokens`, `mtmd`), each printing one JSON line; the functions above
`# worker` are the parent side and import nothing from the venv.

    python benchmarks/llamacpp.py install          # build (or check) the venv, print the version
    python benchmarks/llamacpp.py bench HF_DIR     # convert, quantize, time bf16 / Q8_0 / Q4_K_M
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
VERSION = "0.3.36"  # the release this was built and measured with; its vendored llama.cpp has QWEN35
# QWEN35_LLAMACPP_SIMD picks the build: "avx512" (the default: what the development machines have) or "avx2"
# (x86-64-v3, what most laptops have: Intel Core since Alder Lake, AMD before Zen 4), to run beside qwen35's
# portable kernels held to the same level (benchmarks/bench_portable.py --llama-cpp). Each has its own folder.
SIMD_ARGS = {
    "avx512": "-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON",
    "avx2": "-DGGML_AVX512=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON",
}
SIMD = os.environ.get("QWEN35_LLAMACPP_SIMD", "avx512")
if SIMD not in SIMD_ARGS:
    raise SystemExit(f"QWEN35_LLAMACPP_SIMD={SIMD!r}: expected one of {sorted(SIMD_ARGS)}")
CMAKE_ARGS = "-DGGML_NATIVE=OFF " + SIMD_ARGS[SIMD]
# vendor/llama.cpp/requirements/requirements-convert_hf_to_gguf.txt, except torch: the converter pins 2.11.0,
# which here means a multi-GB CUDA download; the CPU 2.13.0 on this machine's disk does the same job.
CONVERTER_DEPS = [
    "torch==2.13.0",
    "numpy~=2.2.6",
    "sentencepiece>=0.1.98,<0.3.0",
    "transformers==4.57.6",
    "protobuf>=4.21.0,<5.0.0",
]


def _machine_cache() -> Path:
    """Where the build lives: once per machine (not per checkout, so a fresh clone or a second worktree reuses
    it), in a folder named by everything that changes the build: the release, CMAKE_ARGS, the converter's deps
    and the Python that makes the venv. QWEN35_LLAMACPP_CACHE moves it (a fresh folder = a fresh machine)."""
    import hashlib

    root = Path(os.environ.get("QWEN35_LLAMACPP_CACHE") or Path.home() / ".cache" / "qwen35" / "llamacpp")
    key = json.dumps([VERSION, CMAKE_ARGS, CONVERTER_DEPS, sys.version, sys.base_prefix])
    return root / f"{VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


BUILD = _machine_cache()
VENV = BUILD / "venv"
SRC = BUILD / "src"
LOG = BUILD / "install.log"
LOCK = BUILD / "install.lock"
FTYPES = {"f32": 0, "bf16": 32, "q8_0": 7, "q4_k_m": 15}  # llama_ftype values (llama.h)
# BPE pre-tokenizer hashes the converter does not know, with the llama.cpp pre-tokenizer that implements them.
# The hash is over the ids of one check string, so it changes when the merges do: the bundled model's BPE
# (scripts/bundled_data.py, trained on Qwen3.5's split regex + byte level, i.e. llama.cpp's "qwen35"). The
# replica's Qwen3.5 tokenizer needs no entry: the converter knows its hash.
EXTRA_PRE_TOKENIZERS = {"c68d6943df7159b52a5e85f306153439fae31e3b47da345d9a0577b0bc186695": "qwen35"}


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _venv_check() -> dict:
    """What the venv has: llama_cpp's version (None if missing) and whether the converter's imports work."""
    if not venv_python().is_file():
        return {"llama_cpp": None, "converter_deps": False}
    code = (
        "import json, importlib.util as u\n"
        "try:\n import llama_cpp; v = llama_cpp.__version__\nexcept Exception: v = None\n"
        "deps = all(u.find_spec(m) for m in ('torch', 'numpy', 'transformers', 'sentencepiece', 'yaml'))\n"
        "print(json.dumps({'llama_cpp': v, 'converter_deps': deps}))"
    )
    r = subprocess.run([str(venv_python()), "-c", code], capture_output=True, text=True, check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {"llama_cpp": None, "converter_deps": False}


def sdist() -> Path:
    """llama-cpp-python's source release, downloaded once and unpacked beside itself; the install builds from
    this file and the converter comes from its vendored llama.cpp tree."""
    tar = SRC / f"llama_cpp_python-{VERSION}.tar.gz"
    if not tar.is_file():
        SRC.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps", "-d", str(SRC)]
        r = subprocess.run([*cmd, f"llama-cpp-python=={VERSION}"], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"downloading llama-cpp-python {VERSION}'s source failed:\n{r.stderr[-1500:]}")
    if not (llama_cpp_tree() / "convert_hf_to_gguf.py").is_file():
        with tarfile.open(tar) as t:
            t.extractall(SRC, filter="data")
    return tar


def llama_cpp_tree() -> Path:
    """vendor/llama.cpp inside the unpacked sdist: convert_hf_to_gguf.py, conversion/, gguf-py/."""
    return SRC / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def installed() -> bool:
    have = _venv_check()
    return have["llama_cpp"] == VERSION and have["converter_deps"] and llama_cpp_tree().is_dir()


def _build() -> None:
    """The build itself (`llamacpp.py _build`, in its own process): under an exclusive lock on the build folder,
    so two test runs or benchmarks on one machine build it once; the second finds it done when the lock frees."""
    import fcntl

    BUILD.mkdir(parents=True, exist_ok=True)
    os.nice(10)  # it often builds beside a test run: the tests' cores come first
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        have = _venv_check()
        if installed():
            print(f"llama-cpp-python {VERSION} already built in {VENV}", flush=True)
            return
        tar = sdist()
        py = str(venv_python())
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
        steps = []
        if not venv_python().is_file():
            steps.append([sys.executable, "-m", "venv", str(VENV)])
        if have["llama_cpp"] != VERSION:
            # --no-cache-dir: pip's wheel cache keys on the sdist alone, and would hand back a wheel built with
            # other CMAKE_ARGS or for another CPU
            steps.append([py, "-m", "pip", "install", "--no-cache-dir", "-v", str(tar)])
        if not have["converter_deps"]:
            steps.append([py, "-m", "pip", "install", *CONVERTER_DEPS])
        for cmd in steps:
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=env)


def start_install() -> subprocess.Popen | None:
    """Start building whatever is missing, in the background (log: `LOG`). Returns None when nothing is."""
    if installed():
        return None
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(LOG, "a") as log:
        return subprocess.Popen(
            [sys.executable, __file__, "_build"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_install(proc: subprocess.Popen | None, poll_s: float = 30.0, say=None) -> str:
    """Wait for `start_install`'s build, saying how far it got every `poll_s` (through `say`, default stderr);
    returns llama_cpp's version."""
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    if proc is not None:
        t0 = time.monotonic()
        while True:
            try:
                proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                steps = [ln for ln in LOG.read_text(errors="replace").splitlines() if ln.lstrip().startswith("[")]
                say(f"llama-cpp-python build: {time.monotonic() - t0:.0f}s, {steps[-1].split()[0] if steps else '...'}")
        if proc.returncode != 0:
            tail = LOG.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"llama-cpp-python install failed (rc {proc.returncode}); see {LOG}:\n{tail}")
    if not installed():
        raise RuntimeError(f"llama.cpp venv incomplete after install: {_venv_check()}; see {LOG}")
    return _venv_check()["llama_cpp"]


def ensure_installed() -> str:
    return wait_install(start_install())


def load_mark() -> tuple[float, float, float]:
    """(wall, CPU seconds all processes used, CPU seconds this process and its finished children used), for
    `others_cores`: the 2 cores here are shared, and ggml's spinning threads slow down many times over when
    another process takes a core, so every timing says how much other work ran beside it."""
    import resource

    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    busy = (f[0] + f[1] + f[2] + f[5] + f[6]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq
    own = sum(
        getattr(resource.getrusage(w), a)
        for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for a in ("ru_utime", "ru_stime")
    )
    return time.perf_counter(), busy, own


def others_cores(mark: tuple[float, float, float]) -> float:
    """Cores' worth of CPU that other processes used since `mark`."""
    now = load_mark()
    return round(max(0.0, (now[1] - mark[1]) - (now[2] - mark[2])) / (now[0] - mark[0]), 2)


def _worker(*args: str, timeout: float | None = None) -> dict:
    """Run one of this file's worker commands in the venv; returns its JSON line, or {"error": ...}."""
    r = subprocess.run(
        [str(venv_python()), __file__, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr or r.stdout)[-1500:].strip(), "rc": r.returncode}
    return json.loads(lines[-1])


# what the converter picks its model class by, for configs written without it (transformers 5 writes
# `"architectures": null` for a model built from a config, as the test replicas are)
ARCHITECTURES = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_text": "Qwen3_5ForCausalLM"}


def stage(hf_dir: Path, tokenizer_dir: Path | None, out: Path, tokenizer: bool = True) -> Path:
    """A checkpoint directory for the converter: the weights of `hf_dir` (links) and the tokenizer files of
    `tokenizer_dir` (or of `hf_dir`). A tokenizer_config.json without a tokenizer_class gets the fast one, so
    transformers never has to map a model_type it does not know (qwen3_5 is newer than the converter's pin).
    A config.json without `architectures` gets its model_type's (ARCHITECTURES). tokenizer=False: no tokenizer
    files (an mmproj holds none)."""
    tok_dir = tokenizer_dir or hf_dir
    if tokenizer and not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"the converter needs a tokenizer and {tok_dir} has no tokenizer.json")
    out.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.name.startswith("tokenizer") or f.is_dir():
            continue
        if f.name == "config.json":
            cfg = json.loads(f.read_text())
            if not cfg.get("architectures") and cfg.get("model_type") in ARCHITECTURES:
                cfg["architectures"] = [ARCHITECTURES[cfg["model_type"]]]
                (out / f.name).unlink(missing_ok=True)
                (out / f.name).write_text(json.dumps(cfg, indent=2))
                continue
        if not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    if not tokenizer:
        return out
    (out / "tokenizer.json").unlink(missing_ok=True)
    (out / "tokenizer.json").symlink_to((tok_dir / "tokenizer.json").resolve())
    cfg_file = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def convert(hf_dir: Path, out: Path, outtype: str = "bf16", tokenizer_dir: Path | None = None) -> dict:
    """HF checkpoint -> GGUF (`outtype`: f32, bf16, ...) with llama.cpp's convert_hf_to_gguf.py. Kept, and reused
    while the checkpoint's files are unchanged (name, size, mtime in a .src.json beside it)."""
    hf_dir = Path(hf_dir)
    dirs = [hf_dir] + ([Path(tokenizer_dir)] if tokenizer_dir else [])
    source = sorted(
        [str(f), f.stat().st_size, f.stat().st_mtime_ns] for d in dirs for f in d.iterdir() if f.is_file()
    )
    stamp = out.with_suffix(".src.json")
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == source:
        return {"gguf": str(out), "cached": True}
    staged = stage(hf_dir, tokenizer_dir and Path(tokenizer_dir), out.parent / f"{out.stem}.hf")
    r = _worker("convert", str(staged), str(out), outtype, hf_dir.name)
    for f in staged.iterdir():
        f.unlink()
    staged.rmdir()
    if "error" not in r:
        stamp.write_text(json.dumps(source))
    return r


def quantize(src: Path, out: Path, kind: str) -> dict:
    """GGUF -> GGUF in `kind` (q8_0, q4_k_m) with llama_model_quantize; kept while newer than `src`."""
    if out.is_file() and out.stat().st_mtime_ns > src.stat().st_mtime_ns:
        return {"gguf": str(out), "cached": True}
    return _worker("quantize", str(src), str(out), kind)


def content_key(*dirs: Path) -> str:
    """A hash of the files in `dirs` (names and bytes): what a conversion depends on, wherever the files are."""
    import hashlib

    h = hashlib.sha256(json.dumps([VERSION, sorted(EXTRA_PRE_TOKENIZERS.items())]).encode())
    for d in dirs:
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                h.update(f.name.encode() + b"\0")
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 24):
                        h.update(chunk)
    return h.hexdigest()[:16]


def made_ggufs(hf_dir: Path, name: str, kinds=("bf16", "q8_0", "q4_k_m"), tokenizer_dir: Path | None = None) -> dict:
    """llama.cpp's own GGUFs of a checkpoint: its converter's bf16 file and its quantizer's other `kinds`.
    Kept once per machine beside the build, keyed by the checkpoint's content (a rebuilt identical replica
    reuses them), under a lock so concurrent runs make them once. Returns {kind: Path}."""
    import fcntl
    import shutil

    out = BUILD / "gguf" / f"{name}-{content_key(*[d for d in (hf_dir, tokenizer_dir) if d])}"
    files = {k: out / f"model-{k}.gguf" for k in ("bf16", *kinds)}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for k, f in files.items():
            if f.is_file():
                continue
            part = f.with_suffix(".part")
            if k == "bf16":
                staged = stage(Path(hf_dir), tokenizer_dir and Path(tokenizer_dir), out / "hf")
                r = _worker("convert", str(staged), str(part), "bf16", name)
                shutil.rmtree(staged)
            else:
                r = _worker("quantize", str(files["bf16"]), str(part), k)
            if "error" in r:
                raise RuntimeError(f"llama.cpp could not make the {k} GGUF of {hf_dir}: {r['error']}")
            part.rename(f)
    return files


def tokens(gguf: Path, texts: list[str], n_gen: int, threads: int = 2) -> dict:
    """llama.cpp's tokenization of `texts` (special tokens parsed, no BOS added) and `n_gen` greedy tokens
    after the first text: {"tokens": [[...], ...], "greedy": [...]}."""
    return _worker("tokens", str(gguf), json.dumps(texts), str(n_gen), str(threads))


def convert_mmproj(hf_dir: Path, out: Path, outtype: str = "f32", name: str = "mmproj") -> dict:
    """The vision tower of a composite HF checkpoint -> llama.cpp's mmproj GGUF (`convert_hf_to_gguf.py
    --mmproj`; `outtype` f32, bf16, f16 or q8_0), written afresh each call (a few seconds for a replica)."""
    import shutil

    staged = stage(Path(hf_dir), None, out.parent / f"{out.stem}.hf", tokenizer=False)
    try:
        return _worker("convert", str(staged), str(out), outtype, name, "mmproj")
    finally:
        shutil.rmtree(staged)


def mtmd(text_gguf: Path, mmproj: Path, rgb: Path, prompt: str, n_gen: int, out_embd: Path, out_logits: Path,
         threads: int = 2) -> dict:
    """llama.cpp's libmtmd on one image: the raw RGB pixels in `rgb` (.npy uint8 [H, W, 3]; sides that need no
    resize, as libmtmd pads where qwen35 stretches) where `prompt` holds mtmd's default marker. Writes the image
    embeddings (`out_embd`, fp32 [tokens, n_embd]) and the logits after the prompt (`out_logits`, fp32 [vocab]);
    returns {"chunks": [text token ids or {"image_tokens", "n_pos"}], "n_past", "greedy": n_gen tokens}. The
    tower runs without flash attention (its F16 K/V would add a rounding qwen35 does not make)."""
    return _worker("mtmd", str(text_gguf), str(mmproj), str(rgb), prompt, str(n_gen), str(out_embd),
                   str(out_logits), str(threads))


def time_model(
    gguf: Path, prompt_tokens: int = 512, gen_tokens: int = 64, threads: int = 2, seed: int = 0
) -> dict:
    """Prefill `prompt_tokens` random tokens, then decode `gen_tokens` greedily; tok/s, RSS, size, bits/weight."""
    return _worker("time", str(gguf), str(prompt_tokens), str(gen_tokens), str(threads), str(seed))


def logits(gguf: Path, rows: Path, out: Path, threads: int = 2) -> dict:
    """Log-probs of every position of the token rows in `rows` (.npy, int [N, T]) -> `out` (.npy, fp32 [N, T, V])."""
    return _worker("logits", str(gguf), str(rows), str(out), str(threads))


def bench(
    hf_dir: Path, work: Path, tokenizer_dir: Path | None = None, kinds=("bf16", "q8_0", "q4_k_m"), **timing
) -> dict:
    """Convert `hf_dir` to bf16 GGUF under `work`, quantize it to the other `kinds`, time each one."""
    work.mkdir(parents=True, exist_ok=True)
    files = {"bf16": work / "model-bf16.gguf"}
    out = {"llama_cpp_python": ensure_installed(), "models": {}}
    c = convert(hf_dir, files["bf16"], "bf16", tokenizer_dir)
    if "error" in c:
        return {**out, "error": f"convert: {c['error']}"}
    for kind in kinds:
        if kind != "bf16":
            files[kind] = work / f"model-{kind}.gguf"
            q = quantize(files["bf16"], files[kind], kind)
            if "error" in q:
                out["models"][kind] = {"error": f"quantize: {q['error']}"}
                continue
        out["models"][kind] = time_model(files[kind], **timing)
    return out


# worker: these run in the venv's python, where llama_cpp is importable


def _convert_worker(hf_dir: str, out: str, outtype: str, name: str, what: str = "model") -> dict:
    """`what`: "model" (the text model) or "mmproj" (the vision tower, --mmproj)."""
    import hashlib

    tree = llama_cpp_tree()
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    from conversion import base  # the same module object the converter script imports below

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        # the converter hashes the token ids of one check string; record them to look the hash up here too
        seen, encode = [], tokenizer.encode
        tokenizer.encode = lambda *a, **k: seen.append(ids := encode(*a, **k)) or ids
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            chkhsh = hashlib.sha256(str(seen[0]).encode()).hexdigest() if seen else None
            if chkhsh in EXTRA_PRE_TOKENIZERS:
                return EXTRA_PRE_TOKENIZERS[chkhsh]
            raise NotImplementedError(
                f"BPE pre-tokenizer hash {chkhsh} unknown to this converter and to "
                "llamacpp.EXTRA_PRE_TOKENIZERS"
            ) from None
        finally:
            del tokenizer.encode

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    import runpy

    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outtype", outtype, "--outfile", out, "--model-name", name,
                *(["--mmproj"] if what == "mmproj" else [])]
    t0 = time.perf_counter()
    runpy.run_path(str(tree / "convert_hf_to_gguf.py"), run_name="__main__")
    return {
        "gguf": out,
        "outtype": outtype,
        "seconds": round(time.perf_counter() - t0, 1),
        "size_mb": round(Path(out).stat().st_size / 2**20, 1),
    }


def _quantize_worker(src: str, out: str, kind: str) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = os.cpu_count() or 1
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {kind}) returned {rc}")
    return {
        "gguf": out,
        "kind": kind,
        "seconds": round(time.perf_counter() - t0, 1),
        "size_mb": round(Path(out).stat().st_size / 2**20, 1),
    }


def _stats_worker(gguf: str) -> dict:
    """Size and bits per weight of a GGUF, over all its tensors and without the MTP (nextn) layer, which the
    converter keeps and qwen35's speed rows do not load; and how many tensors each ggml type holds."""
    tree = llama_cpp_tree()
    sys.path[:0] = [str(tree / "gguf-py")]
    from collections import Counter

    from gguf import GGUFReader

    r = GGUFReader(gguf)
    arch = r.fields["general.architecture"].contents()
    n_layer = r.fields[f"{arch}.block_count"].contents()
    nextn = (
        r.fields[f"{arch}.nextn_predict_layers"].contents()
        if f"{arch}.nextn_predict_layers" in r.fields
        else 0
    )
    mtp = tuple(f"blk.{i}." for i in range(n_layer - nextn, n_layer))
    main = [t for t in r.tensors if not t.name.startswith(mtp)]

    def bpw(ts) -> float:
        return round(sum(int(t.n_bytes) for t in ts) * 8 / sum(int(t.n_elements) for t in ts), 3)

    return {
        "file_mb": round(Path(gguf).stat().st_size / 2**20, 1),
        "n_params": sum(int(t.n_elements) for t in r.tensors),
        "bits_per_weight": bpw(r.tensors),
        "bits_per_weight_no_mtp": bpw(main),
        "tensor_types": dict(Counter(t.tensor_type.name for t in r.tensors)),
    }


def stats(gguf: Path) -> dict:
    return _worker("stats", str(gguf))


def _load(gguf: str, n_ctx: int, threads: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(
        model_path=gguf,
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


def _last_logits(llm):
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def _peak_rss_mb() -> float:
    """VmHWM, as qwen35 bench reports it (ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _time_worker(gguf: str, prompt_tokens: str, gen_tokens: str, threads: str, seed: str) -> dict:
    """The same protocol as `qwen35 bench`: a short warm-up outside the timings, then prefill up to and
    including the first greedy token, then the other gen_tokens - 1 decode steps."""
    import random

    import llama_cpp

    P, G, n_threads = int(prompt_tokens), int(gen_tokens), int(threads)
    t0 = time.perf_counter()
    llm = _load(gguf, P + G + 8, n_threads)
    load_s = time.perf_counter() - t0
    vocab = llm.n_vocab()
    rng = random.Random(int(seed))
    prompt = [rng.randrange(min(vocab, 248044)) for _ in range(P)]  # ids below Qwen3.5's special tokens
    llm.eval(prompt[:8])
    llm.eval([int(_last_logits(llm).argmax())])
    llm.reset()

    mark = load_mark()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(_last_logits(llm).argmax())
    t1 = time.perf_counter()
    for _ in range(G - 1):
        llm.eval([tok])
        tok = int(_last_logits(llm).argmax())
    t2 = time.perf_counter()
    others = others_cores(mark)
    return {
        "gguf": gguf,
        "threads": n_threads,
        "prompt_tokens": P,
        "gen_tokens": G,
        "load_s": round(load_s, 3),
        "prefill_tok_s": round(P / (t1 - t0), 2),
        "decode_tok_s": round((G - 1) / (t2 - t1), 2),
        "peak_rss_mb": _peak_rss_mb(),
        "others_cores": others,
        "flash_attn": False,
        "llama_cpp_python": llama_cpp.__version__,
        **_stats_worker(gguf),
    }


def _logits_worker(gguf: str, rows: str, out: str, threads: str) -> dict:
    import numpy as np

    ids = np.load(rows)
    N, T = ids.shape
    llm = _load(gguf, T + 8, int(threads), logits_all=True)
    res = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(N, T, llm.n_vocab()))
    t0 = time.perf_counter()
    for i in range(N):
        llm.reset()
        llm.eval(ids[i].tolist())
        z = llm.scores[:T].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        res[i] = z - np.log(np.exp(z).sum(-1, keepdims=True))
    res.flush()
    return {"logprobs": out, "rows": N, "tokens": N * T, "seconds": round(time.perf_counter() - t0, 1)}


def _tokens_worker(gguf: str, texts_json: str, n_gen: str, threads: str) -> dict:
    texts = json.loads(texts_json)
    llm = _load(gguf, 512, int(threads))
    toks = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    llm.reset()
    llm.eval(toks[0])
    greedy = []
    for _ in range(int(n_gen)):
        t = int(_last_logits(llm).argmax())
        greedy.append(t)
        llm.eval([t])
    return {"tokens": toks, "greedy": greedy}


def _mtmd_worker(text_gguf: str, mmproj: str, rgb: str, prompt: str, n_gen: str, out_embd: str, out_logits: str,
                 threads: str) -> dict:
    import ctypes

    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd
    import numpy as np

    n_threads = int(threads)
    llm = llama_cpp.Llama(model_path=text_gguf, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=n_threads,
                          n_threads_batch=n_threads, verbose=False)
    p = mtmd.mtmd_context_params_default()
    p.use_gpu, p.n_threads, p.print_timings, p.warmup = False, n_threads, False, False
    p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # fp32 K/V in the tower's attention
    ctx = mtmd.mtmd_init_from_file(mmproj.encode(), llm.model, p)
    if not ctx:
        raise RuntimeError(f"mtmd_init_from_file({mmproj}) failed")
    pixels = np.ascontiguousarray(np.load(rgb), dtype=np.uint8)
    h, w, _ = pixels.shape
    bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes()))
    text = mtmd.mtmd_input_text()
    raw = prompt.encode()
    text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), False, True
    chunks = mtmd.mtmd_input_chunks_init()
    if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
        raise RuntimeError("mtmd_tokenize failed (no marker in the prompt?)")
    out: dict = {"chunks": []}
    n_embd = llama_cpp.llama_model_n_embd(llm.model)
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        c = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ids = mtmd.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
            out["chunks"].append([ids[j] for j in range(n.value)])
            continue
        n_tok = mtmd.mtmd_input_chunk_get_n_tokens(c)
        if mtmd.mtmd_encode_chunk(ctx, c) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        e = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n_tok * n_embd,))
        np.save(out_embd, e.reshape(n_tok, n_embd).copy())
        out["chunks"].append({"image_tokens": n_tok, "n_pos": mtmd.mtmd_input_chunk_get_n_pos(c)})
    n_past = llama_cpp.llama_pos(0)
    if mtmd.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) != 0:
        raise RuntimeError("mtmd_helper_eval_chunks failed")
    np.save(out_logits, _last_logits(llm).copy())
    llm.n_tokens = n_past.value  # M-RoPE: the next text position is n_past, not the number of tokens fed
    greedy = []
    for _ in range(int(n_gen)):
        greedy.append(int(_last_logits(llm).argmax()))
        llm.eval([greedy[-1]])
    mtmd.mtmd_input_chunks_free(chunks)
    mtmd.mtmd_bitmap_free(bitmap)
    mtmd.mtmd_free(ctx)
    return {**out, "n_past": n_past.value, "greedy": greedy}


WORKERS = {
    "convert": _convert_worker,
    "quantize": _quantize_worker,
    "time": _time_worker,
    "logits": _logits_worker,
    "stats": _stats_worker,
    "tokens": _tokens_worker,
    "mtmd": _mtmd_worker,
}


def main() -> None:
    cmd, *args = sys.argv[1:] or ["help"]
    if cmd in WORKERS:
        print(json.dumps(WORKERS[cmd](*args)))
    elif cmd == "_build":
        _build()
    elif cmd == "install":
        print(json.dumps({"llama_cpp_python": ensure_installed(), "venv": str(VENV)}))
    elif cmd == "bench" and args:
        hf = Path(args[0])
        tok = Path(args[1]) if len(args) > 1 else None
        print(json.dumps(bench(hf, CACHE / "gguf" / hf.name, tok)))
    else:
        print(__doc__)


if __name__ == "__main__":
    main()
