"""Building and loading qwen35's C++ CPU kernels (torch custom ops under torch.ops.qwen35).

Compiled on first use with the machine's C++ compiler (torch.utils.cpp_extension, ~35 s on two cores, cached
under TORCH_EXTENSIONS_DIR). Where that cannot work — no compiler, a CPU without AVX512-BF16, or
QWEN35_KERNELS=0 — the reference torch paths run instead, and we say so once, loudly, with the reason.

Quantized weights have a second, portable library (portable_kernels.cpp: vector code built for the machine it
runs on, -march=native, with hand-written int8 dot products for AVX2 and ARM in portable_simd.h), used where the
AVX512 one is unavailable: without it a quantized model would run the reference that dequantizes every matrix at
every call. It also holds the Gated DeltaNet decode step such machines run (portable_gdn_decode,
portable_delta_rule). `portable_available()` builds it; QWEN35_KERNELS=portable makes a machine with AVX512 behave
as one without (tests, benchmarks); QWEN35_PORTABLE_MARCH picks the target (e.g. x86-64-v3, an AVX2 laptop's
instruction set) instead of the build machine's own.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("qwen35")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
SOURCES = [SOURCE] + [Path(__file__).with_name(n) for n in ("quant_kernels.cpp", "quant_k_kernels.cpp",
                                                             "quant_gemm.cpp", "kv_kernels.cpp",
                                                             "decode_stack.cpp", "amx_panels.cpp", "prefill_attn.cpp",
                                                             "topk_kernels.cpp")]
# -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled into this library;
# without the flag every parallel_for here silently runs on one thread (measured: 101% CPU on 2 cores).
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mf16c", "-mfma",
         "-fno-math-errno"]
HEADERS = [Path(__file__).with_name(n) for n in ("quant_common.h", "quantizers.h", "layer_steps.h", "decode_plan.h",
                                                  "fp_contract.h", "delta_rule.h", "avx512_math.h",
                                                  "attn_blocks.h")]  # included by the sources: hashed with them
OPENMP = ["-fopenmp"]  # linked: resolves to the libgomp.so.1 torch already loaded (same soname), one runtime

_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) that stop short of bf16 instructions
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def bf16_matmul_native() -> bool:
    """Whether torch's bf16 matrix products run on bf16 instructions here (x86: AVX512-BF16 or AMX-BF16).
    Without them oneDNN converts the operands to fp32 inside its GEMM, and slowly: 512 x 1024 x 3584 at 22-40
    GFLOP/s where the fp32 GEMM of the same two cores runs 137-160 (Zen 4 limited to AVX2, as an AVX2 laptop is,
    by ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2). A limit set that way counts as the machine's.
    macOS: False: torch's macOS wheels have no oneDNN and take their fp32 GEMM from Apple's Accelerate (on the
    chips' matrix units), a library no bf16 product there has behind it (the 2.13.0 wheel's build settings:
    BLAS_INFO=accelerate, no dnnl; not timed on a Mac). Other architectures: True (not measured; torch's bf16
    product runs as it is). QWEN35_BF16_MATMUL=native or =fp32 decides instead (an ARM machine whose bf16
    product is slow; benchmarks' before / after)."""
    import platform

    forced = os.environ.get("QWEN35_BF16_MATMUL")
    if forced:
        if forced not in ("native", "fp32"):
            raise ValueError(f"QWEN35_BF16_MATMUL must be 'native' or 'fp32', got {forced!r}")
        return forced == "native"
    if sys.platform == "darwin":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _NO_BF16_ISAS:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _cpu_has_avx512_bf16() -> bool:
    # the kernels use AVX512-BF16 dot products, and the quantized ones AVX512-VNNI: every CPU with the
    # former (Cooper Lake, Sapphire Rapids, Zen 4 and later) has the latter
    flags = cpu_flags()
    return {"avx512_bf16", "avx512bw", "avx512_vnni", "f16c"} <= flags


def _say(msg: str) -> None:
    """Loudly: to the log and to stderr (a CLI user sees it whatever the logging setup)."""
    log.warning(msg)
    print(msg, flush=True, file=sys.stderr)


def _note(msg: str) -> None:
    """Not a problem, but worth knowing (a pause of a minute): to the log and to stderr."""
    log.info(msg)
    print(msg, flush=True, file=sys.stderr)


def _extensions_root(name: str) -> Path | None:
    """The directory under which torch keeps its compiled libraries (each in a directory of its name; it makes
    `name`'s, as a build of it would); None where that cannot be told."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False)).parent
    except Exception:  # noqa: BLE001 - a private helper of torch's: if it moved, say nothing rather than fail
        return None


def _once(state: dict, load, failure: str) -> bool:
    """state["ok"], running load() -> (ok, why) on the first call only (under the lock); a failure is said once,
    `failure` formatted with its reason."""
    if "ok" not in state:
        with _lock:
            if "ok" not in state:
                ok, why = load()
                state["ok"], state["why"] = ok, why
                if not ok:
                    _say(failure.format(why=why))
    return bool(state["ok"])


def _registered(op: str) -> bool:
    """Whether torch.ops.qwen35.<op> exists already (e.g. loaded by another import path)."""
    import torch

    try:
        return getattr(torch.ops.qwen35, op) is not None
    except (AttributeError, RuntimeError):
        return False


def openmp_variants() -> list[tuple[list[str], list[str]]]:
    """The ways to build with OpenMP here, best first, as (compile flags, link flags). Linux: -fopenmp (GCC's
    libgomp, the runtime torch loaded). macOS: Apple's clang has no -fopenmp driver flag, but torch's macOS wheels
    ship OpenMP's header (torch/include/omp.h) and runtime (torch/lib/libomp.dylib): the flag goes to the compiler
    proper and the library links torch's own runtime (one runtime in the process, as on Linux); then plain
    -fopenmp for a GCC there."""
    if sys.platform == "darwin":
        import torch

        lib = str(Path(torch.__file__).resolve().parent / "lib")
        return [(["-Xclang", "-fopenmp"], [f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"]), (OPENMP, OPENMP)]
    return [(OPENMP, OPENMP)]


def _build_error(e: Exception) -> str:
    """The compiler's first error line in a failed build's message (torch's first line is the whole command)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower() and not ln.startswith("Error building extension")]
    return (errors or lines or [type(e).__name__])[0][:300]


def _build(name: str, sources: list[Path], headers: list[Path], flags: list[str], what: str,
           key: bytes = b"") -> tuple[bool, str]:
    """Compile `sources` into the library `name`_<tag> and load it: with OpenMP (each of openmp_variants() in
    turn), else without it (saying so with the compiler's error line). The tag hashes the sources, their headers,
    their directory, the compiler and `key`, so two qwen35 versions (an upgrade) or two checkouts never share,
    and keep rebuilding, one cached library: torch records the source paths in a build, and a second checkout of
    the same sources rebuilt it (~35 s) each time either one loaded it. Returns (ok, why)."""
    import hashlib

    from torch.utils.cpp_extension import load

    where = str(sources[0].resolve().parent).encode()
    compiler = os.environ.get("CXX", "c++").encode()  # torch builds with $CXX: a switch of compiler is a new build
    tag = hashlib.sha256(b"".join(p.read_bytes() for p in sources + headers) + where + key + compiler).hexdigest()[:10]
    first = ""
    names = [f"{name}_{tag}"] + [f"{name}_omp{i}_{tag}" for i in range(1, len(openmp_variants()))]
    names.append(f"{name}_serial_{tag}")  # (the names the builds below use, in their order)
    root = _extensions_root(names[0])
    if root is not None and not any((root / n / f"{n}.so").exists() for n in names):
        # the first use on a machine (or of a new version) compiles for a minute before anything happens
        _note(f"qwen35: compiling the {what} for this CPU, once (about a minute on two cores; kept in {root})")
    for i, (cflags, ldflags) in enumerate(openmp_variants()):
        try:
            load(name=f"{name}_{tag}" if i == 0 else f"{name}_omp{i}_{tag}", sources=[str(p) for p in sources],
                 extra_cflags=flags + cflags, extra_ldflags=ldflags, is_python_module=False, verbose=False)
            return True, ""
        except Exception as e:  # noqa: BLE001 - maybe only OpenMP is missing: try the next way, then without it
            first = first or _build_error(e)
    try:
        load(name=f"{name}_serial_{tag}", sources=[str(p) for p in sources], extra_cflags=flags, is_python_module=False,
             verbose=False)
        _say(f"qwen35: {what} built without OpenMP ({first}); they run on one thread")
        return True, ""
    except Exception:  # noqa: BLE001 - any build failure means: fall back, and say why
        return False, f"could not build them: {first}"


def available() -> bool:
    """True when torch.ops.qwen35 kernels are loaded (building them on the first call)."""
    return _once(_state, _load, "qwen35: fast CPU kernels unavailable ({why}); using the slower torch reference path")


def unavailable_reason() -> str | None:
    available()
    return None if _state["ok"] else str(_state["why"])


def _load() -> tuple[bool, str]:
    if os.environ.get("QWEN35_KERNELS", "1") == "0":
        return False, "disabled by QWEN35_KERNELS=0"
    if os.environ.get("QWEN35_KERNELS") == "portable":
        return False, "QWEN35_KERNELS=portable: the portable kernels run the quantized weights"
    if not _cpu_has_avx512_bf16():
        return False, "this CPU lacks AVX512-BF16 or AVX512-VNNI"
    if _registered("gemv_bf16"):
        return True, ""
    return _build("qwen35_cpu_kernels", SOURCES, HEADERS, FLAGS, "kernels")


PORTABLE_SOURCES = [Path(__file__).with_name(n) for n in ("portable_kernels.cpp", "portable_layers.cpp",
                                                          "portable_gemm.cpp", "topk_kernels.cpp")]
PORTABLE_HEADERS = [Path(__file__).with_name(n) for n in ("quantizers.h", "portable_simd.h", "portable_rows.h",
                                                          "layer_steps.h", "decode_plan.h", "fp_contract.h",
                                                          "delta_rule.h", "attn_blocks.h")]
_portable: dict[str, object] = {}


def _portable_target() -> list[str]:
    """The CPU the portable library is built for: this one (-march=native / -mcpu=native) or
    QWEN35_PORTABLE_MARCH's."""
    import platform

    march = os.environ.get("QWEN35_PORTABLE_MARCH")
    if march:
        return [f"-march={march}"]
    if platform.machine().lower() in ("x86_64", "amd64", "i686"):
        return ["-march=native"]
    return ["-mcpu=native"]  # aarch64 and the rest: GCC and clang spell it -mcpu


def _portable_flags(target: bool = True) -> list[str]:
    """-O3 for the machine this runs on (its vector unit does the dot products; target=False: the
    architecture's baseline), no fused multiply-adds (the dequantizer and quantizers must round as the reference
    does). QWEN35_PORTABLE_LIBRARY: a source both libraries compile (topk_kernels.cpp) registers its op under the
    portable name."""
    return ["-O3", "-ffp-contract=off", "-fno-math-errno", "-DQWEN35_PORTABLE_LIBRARY"] + (
        _portable_target() if target else [])


def portable_available() -> bool:
    """True when the portable quantized-weight ops (torch.ops.qwen35.portable_*) are loaded, building them on
    the first call; a failure is said once, loudly, and the torch reference runs."""
    return _once(_portable, _load_portable,
                 "qwen35: portable kernels for quantized weights unavailable ({why}); quantized matrices run the "
                 "torch reference, which dequantizes them at every call: slow")


def _load_portable() -> tuple[bool, str]:
    if os.environ.get("QWEN35_KERNELS", "1") == "0":
        return False, "disabled by QWEN35_KERNELS=0"
    if _registered("portable_gemv"):
        return True, ""
    flags = _portable_flags()
    # -march=native code is this CPU's: the build is named after the CPU's features too, so a home directory
    # shared by two machines never hands one the other's instructions
    key = " ".join(flags + sorted(cpu_flags())).encode()
    ok, why = _build("qwen35_portable", PORTABLE_SOURCES, PORTABLE_HEADERS, flags, "portable kernels", key)
    if ok or os.environ.get("QWEN35_PORTABLE_MARCH"):
        return ok, why
    # a compiler that does not know this CPU (an older clang refuses -mcpu=native) still builds for the
    # architecture's baseline: slower dot products, far faster than the reference
    base = _portable_flags(target=False)
    ok, _ = _build("qwen35_portable", PORTABLE_SOURCES, PORTABLE_HEADERS, base, "portable kernels",
                   " ".join(base).encode())
    if ok:
        _say(f"qwen35: portable kernels built for the architecture's baseline, not this CPU ({why}); "
             "their dot products are slower")
        return True, ""
    return False, why


def portable_gemm_vectorized() -> bool:
    """True when the portable library is loaded with its AVX2 integer GEMM (portable_gemm.cpp); elsewhere (ARM,
    x86 without AVX2) that op runs a plain C++ form, correct but no faster than dequantizing (not measured)."""
    import torch

    return portable_available() and torch.ops.qwen35.portable_gemm_vectorized()


def portable_reason() -> str | None:
    portable_available()
    return None if _portable["ok"] else str(_portable["why"])
