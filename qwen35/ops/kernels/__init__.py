"""Building and loading qwen35's C++ CPU kernels (torch custom ops under torch.ops.qwen35).

Compiled on first use with the machine's C++ compiler (torch.utils.cpp_extension, ~35 s on two cores, cached
under TORCH_EXTENSIONS_DIR). Where that cannot work — no compiler, a CPU without AVX512-BF16, or
QWEN35_KERNELS=0 — the reference torch paths run instead, and we say so once, loudly, with the reason.

Quantized weights have a second, portable library (portable_kernels.cpp: plain C++ built for the machine it runs
on, -march=native), used where the AVX512 one is unavailable: without it a quantized model would run the
reference that dequantizes every matrix at every call. `portable_available()` builds it; QWEN35_KERNELS=portable
makes a machine with AVX512 behave as one without (tests, benchmarks); QWEN35_PORTABLE_MARCH picks the target
(e.g. x86-64-v3, an AVX2 laptop's instruction set) instead of the build machine's own.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("qwen35")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
SOURCES = [SOURCE] + [Path(__file__).with_name(n) for n in ("quant_kernels.cpp", "quant_k_kernels.cpp",
                                                             "quant_gemm.cpp", "kv_kernels.cpp",
                                                             "decode_stack.cpp", "amx_panels.cpp",
                                                             "topk_kernels.cpp")]
# -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled into this library;
# without the flag every parallel_for here silently runs on one thread (measured: 101% CPU on 2 cores).
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mf16c", "-mfma",
         "-fno-math-errno"]
HEADERS = [Path(__file__).with_name(n) for n in ("quant_common.h", "quantizers.h")]  # included by the sources: hashed with them
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


def _cpu_has_avx512_bf16() -> bool:
    # the kernels use AVX512-BF16 dot products, and the quantized ones AVX512-VNNI: every CPU with the
    # former (Cooper Lake, Sapphire Rapids, Zen 4 and later) has the latter
    flags = cpu_flags()
    return {"avx512_bf16", "avx512bw", "avx512_vnni", "f16c"} <= flags


def available() -> bool:
    """True when torch.ops.qwen35 kernels are loaded (building them on the first call)."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            ok, why = _load()
            _state["ok"], _state["why"] = ok, why
            if not ok:
                msg = f"qwen35: fast CPU kernels unavailable ({why}); using the slower torch reference path"
                log.warning(msg)
                print(msg, flush=True, file=__import__("sys").stderr)
    return bool(_state["ok"])


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
    import torch

    try:
        if torch.ops.qwen35.gemv_bf16 is not None:  # already registered (e.g. by another import path)
            return True, ""
    except (AttributeError, RuntimeError):
        pass
    import hashlib

    from torch.utils.cpp_extension import load

    # The build is named after its source, so two qwen35 versions (an upgrade, a second checkout) never
    # share, and keep rebuilding, one cached library.
    tag = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:10]
    try:
        load(name=f"qwen35_cpu_kernels_{tag}", sources=[str(p) for p in SOURCES], extra_cflags=FLAGS + OPENMP, extra_ldflags=OPENMP,
             is_python_module=False, verbose=False)
        return True, ""
    except Exception as e:  # noqa: BLE001 - maybe only OpenMP is missing: try without it, and say so
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    try:
        load(name=f"qwen35_cpu_kernels_serial_{tag}", sources=[str(p) for p in SOURCES], extra_cflags=FLAGS, is_python_module=False,
             verbose=False)
        msg = f"qwen35: kernels built without OpenMP ({first}); they run on one thread"
        log.warning(msg)
        print(msg, flush=True, file=__import__("sys").stderr)
        return True, ""
    except Exception:  # noqa: BLE001 - any build failure means: fall back, and say why
        return False, f"could not build them: {first}"


PORTABLE_SOURCE = Path(__file__).with_name("portable_kernels.cpp")
PORTABLE_HEADERS = [Path(__file__).with_name("quantizers.h")]
_portable: dict[str, object] = {}


def _portable_flags() -> list[str]:
    """-O3 for the machine this runs on (its vector unit does the dot products), no fused multiply-adds (the
    dequantizer and quantizers must round as the reference does)."""
    import platform

    march = os.environ.get("QWEN35_PORTABLE_MARCH")
    if march:
        target = [f"-march={march}"]
    elif platform.machine().lower() in ("x86_64", "amd64", "i686"):
        target = ["-march=native"]
    else:  # aarch64 and the rest: GCC and clang spell it -mcpu
        target = ["-mcpu=native"]
    return ["-O3", "-ffp-contract=off", "-fno-math-errno"] + target


def portable_available() -> bool:
    """True when the portable quantized-weight ops (torch.ops.qwen35.portable_*) are loaded, building them on
    the first call; a failure is said once, loudly, and the torch reference runs."""
    if "ok" in _portable:
        return bool(_portable["ok"])
    with _lock:
        if "ok" not in _portable:
            ok, why = _load_portable()
            _portable["ok"], _portable["why"] = ok, why
            if not ok:
                msg = (f"qwen35: portable kernels for quantized weights unavailable ({why}); quantized matrices run "
                       "the torch reference, which dequantizes them at every call: slow")
                log.warning(msg)
                print(msg, flush=True, file=__import__("sys").stderr)
    return bool(_portable["ok"])


def _load_portable() -> tuple[bool, str]:
    if os.environ.get("QWEN35_KERNELS", "1") == "0":
        return False, "disabled by QWEN35_KERNELS=0"
    import hashlib

    import torch
    from torch.utils.cpp_extension import load

    try:
        if torch.ops.qwen35.portable_gemv is not None:
            return True, ""
    except (AttributeError, RuntimeError):
        pass
    flags = _portable_flags()
    # -march=native code is this CPU's: the build is named after the CPU's features too, so a home directory
    # shared by two machines never hands one the other's instructions
    key = b"".join(p.read_bytes() for p in [PORTABLE_SOURCE] + PORTABLE_HEADERS)
    key += " ".join(flags + sorted(cpu_flags())).encode()
    tag = hashlib.sha256(key).hexdigest()[:10]
    first = ""
    for name, extra in ((f"qwen35_portable_{tag}", OPENMP), (f"qwen35_portable_serial_{tag}", [])):
        try:
            load(name=name, sources=[str(PORTABLE_SOURCE)], extra_cflags=flags + extra, extra_ldflags=extra,
                 is_python_module=False, verbose=False)
            return True, ""
        except Exception as e:  # noqa: BLE001 - without OpenMP next, then fall back and say why
            first = first or (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return False, f"could not build them: {first}"


def portable_reason() -> str | None:
    portable_available()
    return None if _portable["ok"] else str(_portable["why"])
