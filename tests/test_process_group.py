"""A torchrun process joins its process group and leaves it with its exit status, never through Python's
shutdown beside gloo's worker threads (qwen35/train/process_group.py says why)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# 20 all-reduces whose tensors the caller drops at once, the group held as FSDP and DDP hold it: leaving through
# Python's shutdown aborted about one run in 4 ("terminate called without an active exception")
ALL_REDUCES = """
import torch
import torch.distributed as dist
from qwen35.train import process_group

held = []


def work():
    held.append(dist.group.WORLD)
    for _ in range(20):
        t = torch.ones(64)
        dist.all_reduce(t)
        del t
    print("rank", dist.get_rank(), "done")  # buffered (a pipe): leaving must flush it
    return 0


process_group.run_and_leave(work)
"""


def start(script: str, rank: int, world: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_processes_leave_after_their_collectives_without_aborting():
    for attempt in range(6):
        procs = [start(ALL_REDUCES, rank, 2, 29640 + attempt) for rank in range(2)]
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        for rank, (code, out, err) in enumerate(results):
            assert code == 0, (attempt, rank, err[-2000:])
            assert out == f"rank {rank} done\n"


@pytest.mark.parametrize(("body", "code", "stderr"), [
    ("return 0", 0, ""),
    ("return None", 0, ""),
    ("return 3", 3, ""),
    ("raise SystemExit(2)", 2, ""),
    ("raise SystemExit('qwen35 train: error: --steps must be positive')", 1,
     "qwen35 train: error: --steps must be positive\n"),
    ("raise RuntimeError('boom')", 1, "RuntimeError: boom\n"),
])
def test_the_exit_status_is_the_work_s(body, code, stderr):
    script = f"""
from qwen35.train import process_group


def work():
    print("working")
    {body}


process_group.run_and_leave(work)
"""
    proc = start(script, 0, 1, 29650)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert out == "working\n"
    assert err.endswith(stderr)
    if code == 1 and "RuntimeError" in stderr:
        assert "Traceback (most recent call last)" in err
