"""One process of a torchrun training run: joining its process group, and leaving it without a crash.

Why leaving is more than destroy_process_group: gloo runs each collective on a worker thread of its own, and
that thread drops its reference to the collective's tensors a moment after the caller's wait() returns. Once the
caller has dropped its own reference (an evaluate()'s sum, an FSDP all-gather's buffer), freeing the tensor's
Python object falls to the worker thread, which needs the GIL for it. destroy_process_group does not stop gloo's
threads while FSDP or DDP still hold the group, and a worker thread that asks for the GIL after Python's shutdown
has begun aborts the process: "terminate called without an active exception", SIGABRT, after a run that had
saved everything (about one two-process run in 30 on a 2-core machine; a 20-all-reduce script, one in 4). A
process therefore leaves with os._exit once its work is done and flushed, and Python's shutdown never runs
beside those threads.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

import torch


def init_process_group() -> None:
    """Join the run torchrun started (its environment names the rank, the world and the rendezvous): NCCL on
    GPUs, gloo on CPUs."""
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def exit_code(error: SystemExit) -> int:
    """The status Python exits with for this SystemExit (a message is printed and gives 1)."""
    if error.code is None or isinstance(error.code, int):
        return error.code or 0
    print(error.code, file=sys.stderr)
    return 1


def run_and_leave(work: Callable[[], int]) -> NoReturn:
    """Run `work` (it returns the exit status; None is 0) in the process group, then leave the process with that
    status. An exception's traceback is printed, as Python would print it, and the status is 1."""
    init_process_group()
    code = 1
    try:
        code = work() or 0
    except SystemExit as e:
        code = exit_code(e)
    except BaseException:  # noqa: BLE001 -- printed as Python would; the process ends just below
        traceback.print_exc()
    leave(code)


def leave(code: int) -> NoReturn:
    """Leave the run and end the process with `code`, skipping Python's shutdown (see above). After a success
    every process waits for the others at a barrier, so none is gone while another still talks to it (a process
    that failed does not: the others may never get there, and torchrun stops them)."""
    dist = torch.distributed
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)
