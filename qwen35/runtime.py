"""Process-wide runtime settings for inference: threads and the allocator.

- Threads default to the machine's cores (torch's own default, which counts physical cores); `set_threads`
  (CLI: --threads) overrides.
- glibc malloc returns every large freed block to the OS and page-faults it back in on the next
  allocation; decode allocates the same few-MB tensors every step, and on virtual machines a page fault
  costs microseconds. `tune_allocator` raises glibc's mmap and trim thresholds so those blocks are reused.
  It changes process-wide behaviour, so the engine entry points call it, not `import qwen35`; set
  QWEN35_MALLOC_TUNING=0 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def set_threads(n: int | None = None) -> int:
    """Use `n` threads for intra-op parallelism (None: one per core). Returns the number in effect."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def tune_allocator() -> bool:
    """Keep large freed blocks in the heap (glibc only). Returns whether tuning is in effect."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("QWEN35_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok


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


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM), in MiB."""
    v = _status_mb("VmHWM")
    if v is not None:
        return v
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
