"""Process-wide runtime settings for inference: threads and the allocator.

- Threads default to the machine's cores (torch's own default, which counts physical cores); `set_threads`
  (CLI: --threads) overrides.
- glibc malloc returns every large freed block to the OS and page-faults it back in on the next
  allocation; decode allocates the same few-MB tensors every step, and on virtual machines a page fault
  costs microseconds. `tune_allocator` raises glibc's mmap and trim thresholds so those blocks are reused.
  It changes process-wide behaviour, so the engine entry points call it, not `import qwen35`; set
  QWEN35_MALLOC_TUNING=0 to leave malloc alone. Training wants the opposite (`tune_allocator(training=
  True)`, which `qwen35 train` calls): a step frees gigabytes of activations of every size, glibc's dynamic
  mmap threshold climbs to 32 MiB after the first large free, and from then on blocks below it come from
  heap arenas that fragment and are never returned, so resident memory grows far past what is live. A
  fixed 1 MiB threshold maps every large tensor on its own and unmaps it when freed.
- Weights live in transparent huge pages where Linux offers them (`WeightArena`): decode streams every
  weight once per token, and with 4 KiB pages that is a TLB miss (a two-level page walk on a virtual
  machine) and a hardware-prefetcher restart every 4 KiB. Measured on the 248320x1024 head here: 30.2 GB/s
  with 4 KiB pages, 33.2 GB/s with 2 MiB pages. QWEN35_HUGEPAGES=0 turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned: str | bool = False  # the mode in effect


def set_threads(n: int | None = None) -> int:
    """Use `n` threads for intra-op parallelism (None: leave torch's choice, one per physical core, which
    skips a core's second hardware thread: it slows the GEMMs). Returns the number in effect."""
    if n is None:
        return torch.get_num_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an integer >= 1, got {n!r}")
    torch.set_num_threads(n)
    return torch.get_num_threads()


def _denormals_left_alone() -> bool:
    return os.environ.get("QWEN35_FLUSH_DENORMALS", "1") == "0"


def flush_denormals(on: bool = True) -> bool:
    """Flush denormal floats to zero (FTZ/DAZ) on the calling thread and on every thread of torch's CPU pool,
    for the rest of the process: the CLI commands do this (their process is ours); library calls get the same
    speed from `denormals_flushed` around the model's forward passes, which restores the setting after.
    Why: the Gated DeltaNet's per-token decays exp(g) multiply into the chunked prefill's decay matrices and
    the recurrent state, and where a head decays fast those products fall below 1.2e-38, the denormal range,
    in which x86 cores take a microcode assist on every operation (the 0.8B shape's 512-token prefill spent
    1.1 of its 2.4 s in bmm / triangular solves slowed that way; flushed: 1.4 s in all). A denormal's
    contribution is below fp32's resolution of any normal-sized sum it joins. QWEN35_FLUSH_DENORMALS=0 leaves
    the setting alone (on=True then does nothing). Returns whether the calling thread flushes."""
    if on and _denormals_left_alone():
        return False
    ok = torch.set_flush_denormal(on)
    from .ops import kernels

    if ok and kernels.available():  # MXCSR is per thread: set it on the pool's threads too
        torch.ops.qwen35.set_flush_denormals(on)
    return ok


@contextlib.contextmanager
def denormals_flushed(active: bool = True):
    """Denormals flushed (as flush_denormals) for the duration of the block, then left as they were: a library
    call does not change how the caller's own floating-point code behaves (e.g. hypothesis refuses to run with
    subnormals flushed). A no-op when not `active` (the model passes tokens > 4: the chunked Gated DeltaNet is
    where denormals cost, decode steps measured the same either way), where they are flushed already (the CLI),
    without the C++ kernels, or with QWEN35_FLUSH_DENORMALS=0. Costs two parallel regions (microseconds)."""
    from .ops import kernels

    if (not active or _denormals_left_alone() or not kernels.available()
            or torch.ops.qwen35.flushing_denormals()):
        yield
        return
    torch.ops.qwen35.set_flush_denormals(True)
    try:
        yield
    finally:
        torch.ops.qwen35.set_flush_denormals(False)


def tune_allocator(training: bool = False) -> bool:
    """Inference: keep large freed blocks in the heap. training: return every block of 1 MiB or more to
    the OS when freed (glibc only). Returns whether tuning is in effect."""
    global _tuned
    mode = "training" if training else "inference"
    if _tuned == mode:
        return True
    if os.environ.get("QWEN35_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    mmap_at, trim_at = (2**20, 64 * 2**20) if training else (32 * 2**20, 2**30)
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_at) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_at) == 1
    except (OSError, AttributeError):
        return False
    _tuned = mode if ok else False
    return ok


_HUGE_PAGE = 2 * 2**20
_HUGE_MIN_BYTES = 4 * 2**20  # smaller models are not worth a mapping of their own


def hugepages_enabled() -> bool:
    return (os.environ.get("QWEN35_HUGEPAGES", "1") != "0" and sys.platform.startswith("linux")
            and hasattr(mmap, "MADV_HUGEPAGE"))


class WeightArena:
    """One allocation for a model's weights, handed out as aligned tensors. Backed by transparent huge
    pages when Linux offers them: an anonymous mapping, 2 MiB-aligned and advised MADV_HUGEPAGE before the
    first write (the loader's reads then fault in whole 2 MiB pages: no copy, no background collapse). One
    mapping rather than one per tensor keeps the 2 MiB rounding to a single page. The memory is freed with
    the last tensor that views it."""

    ALIGN = 64  # a cache line: every weight row stream starts on one

    def __init__(self, nbytes: int):
        self.nbytes, self.used = nbytes, 0
        self.huge = False
        raw = None
        if nbytes >= _HUGE_MIN_BYTES and hugepages_enabled():
            try:
                region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                region.madvise(mmap.MADV_HUGEPAGE)
                raw = torch.frombuffer(region, dtype=torch.uint8)
                start = -raw.data_ptr() % _HUGE_PAGE
                raw, self.huge = raw[start : start + nbytes], True
            except (OSError, ValueError):
                raw = None
        self.raw = raw if raw is not None else torch.empty(nbytes, dtype=torch.uint8)

    @classmethod
    def size_of(cls, shapes_dtypes) -> int:
        return sum(cls._padded(torch.Size(s).numel() * d.itemsize) for s, d in shapes_dtypes)

    @classmethod
    def _padded(cls, n: int) -> int:
        return -(-n // cls.ALIGN) * cls.ALIGN

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        size = torch.Size(shape)
        n = size.numel() * dtype.itemsize
        if self.used + n > self.nbytes:
            raise ValueError(f"weight arena of {self.nbytes} bytes cannot hold {n} more (used {self.used})")
        t = self.raw[self.used : self.used + n].view(dtype).view(size)
        self.used += self._padded(n)
        return t


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB, None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """Resident memory of this process now (VmRSS), in MiB."""
    v = _status_mb("VmRSS")
    return float("nan") if v is None else v


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current resident size (Linux: clear_refs 5), so a later peak_rss_mb() covers
    only what follows (e.g. not a benchmark's own probe buffer). Returns whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM), in MiB."""
    v = _status_mb("VmHWM")
    if v is not None:
        return v
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
