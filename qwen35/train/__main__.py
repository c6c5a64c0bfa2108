"""`python -m qwen35.train ...` — the same flags as `qwen35 train`, and data-parallel under torchrun:

    torchrun --nproc-per-node 2 -m qwen35.train --config CONFIG.json --tokenizer DIR --data FILE --out DIR

Each process joins the process group torchrun describes (gloo on CPU, NCCL on GPUs) and the loop wraps the
model in DistributedDataParallel (with --fsdp it shards it with FSDP2); --batch-size is the global batch, split
across processes.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..commands import train as command
from ..errors import Qwen35Error
from . import process_group


def main(argv: list[str] | None = None) -> int:
    """The exit status; under torchrun (WORLD_SIZE > 1) the process ends here instead, once it has left the
    process group (process_group.run_and_leave says why)."""
    parser = argparse.ArgumentParser(prog="python -m qwen35.train", description=command.__doc__.splitlines()[0])
    command.setup_parser(parser)
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        process_group.run_and_leave(lambda: run(args, distributed=True))
    return run(args, distributed=False)


def run(args: argparse.Namespace, distributed: bool) -> int:
    try:
        return command.main(args) or 0
    except Qwen35Error as e:
        # the checks before training read the same flags and files in every process of a machine: one of them
        # says what failed (every process had printed the same line); in training each process says its own
        if distributed and getattr(args, "training", False):
            print(f"qwen35: error: rank {os.environ.get('RANK')}: {e}", file=sys.stderr)
        elif not distributed or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"qwen35: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
