"""Write a random-weight checkpoint with an official Qwen3.5 shape and layout (for tests and benchmarks).

The weights are random: useful to measure speed and memory and to exercise loaders, not to chat.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..checkpoint import write_random_checkpoint
from ..shapes import SHAPES, composite_config
from .common import POSITIVE, SEED, check_no_checkpoint, check_output_dir, positive_number


def setup_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output directory")
    p.add_argument("--shape", default="0.8b", choices=sorted(SHAPES), help="official shape (default 0.8b)")
    p.add_argument("--layers", type=POSITIVE, default=None, help="override num_hidden_layers (reduced depth)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--shard-gb", type=positive_number, default=None, help="max shard size in GB (default: one shard)")
    p.add_argument("--vision", action="store_true", help="with the size's vision tower (model.visual.*)")


def build_replica(out, shape: str = "0.8b", layers: int | None = None, seed: int = 0,
                  shard_bytes: int | None = None, vision: bool = False, **config_over) -> None:
    over = {"num_hidden_layers": layers} if layers is not None else {}
    over.update(config_over)
    # tensor by tensor, so a 9B replica (19 GB in bf16) is written in ~2 GB of memory
    write_random_checkpoint(composite_config(shape, vision=vision, **over), out, max_shard_bytes=shard_bytes,
                            seed=seed)


def main(args: argparse.Namespace) -> int:
    check_output_dir(Path(args.out))
    check_no_checkpoint(Path(args.out))  # another checkpoint's shards, index and tokenizer would stay beside it
    t0 = time.perf_counter()
    shard = int(args.shard_gb * 1e9) if args.shard_gb is not None else None
    build_replica(args.out, args.shape, args.layers, args.seed, shard, vision=args.vision)
    print(f"wrote {args.shape} replica to {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0
