"""Check a preserved checkpoint (HF directory or GGUF): files, headers, shapes against the config, hashes.

`qwen35 verify PATH [--manifest FILE]` prints one line per problem (missing, corrupt, truncated, wrong shape)
and exits 1 when there is any, 0 when everything checks. Hashes are checked against a manifest: --manifest,
or the qwen35-manifest.json beside the weights that `qwen35 download` writes. `--write-manifest` records one
(sha256 of every file) for a checkpoint you already have, once its structure checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def setup_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="checkpoint directory or .gguf file (any part of a split; or an mmproj)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="manifest to check hashes against (default: qwen35-manifest.json beside the weights)")
    p.add_argument("--write-manifest", action="store_true",
                   help="write qwen35-manifest.json (or --manifest) with the sha256 of every file, after checking")


def main(args: argparse.Namespace) -> int:
    from ..errors import Qwen35Error
    from ..gguf.reader import is_gguf_path
    from ..manifest import MANIFEST, local_manifest, write_manifest
    from ..verify import verify
    from .common import check_output_file

    if args.write_manifest and args.manifest is not None:
        check_output_file(args.manifest)  # before minutes of hashing: a folder, or a file under a missing one
    if args.manifest is not None and not args.manifest.is_file():
        if not args.write_manifest:
            raise Qwen35Error(f"manifest not found: {args.manifest}")
        args_manifest_out, check_against = args.manifest, None
    else:
        args_manifest_out, check_against = args.manifest, args.manifest
    # an existing manifest is checked first, also before writing a new one: never record a corrupted state
    rep = verify(args.path, check_against, say=lambda m: print(m, file=sys.stderr, flush=True))
    for p in rep.problems:
        print(p)
    if not rep.ok:
        print(f"{args.path}: {len(rep.problems)} problem(s)")
        return 1
    if args.write_manifest:
        root = args.path if args.path.is_dir() else args.path.parent
        out = args_manifest_out or root / MANIFEST
        files = rep.files if is_gguf_path(args.path) else sorted(
            f for f in root.rglob("*") if f.is_file() and f.name != MANIFEST and ".cache" not in f.parts)
        entries, source = local_manifest(root, files), "local"
        if out.is_file():
            # add to the manifest there (one manifest for a folder of GGUF models; files added to a download):
            # its records were just checked, so they stay as they are, with their source (a hub download's
            # repo@commit and its hashes had been rewritten as 'local')
            from ..manifest import read_manifest

            old = read_manifest(out)
            entries, source = {**entries, **old["files"]}, old.get("source") or source
        write_manifest(out, entries, source)
        print(f"wrote {out} ({len(files)} files, sha256)")
        return 0
    hashes = (f"{rep.hashed} file(s) match {rep.manifest}" if rep.manifest is not None
              else "hashes not checked (no manifest: `qwen35 verify --write-manifest` records one)")
    implied = "as its metadata implies (an mmproj: a vision tower)" if rep.kind == "mmproj" else \
        "as the config implies"
    with_mmproj = f" (with {rep.mmproj.name}, the mmproj found beside it)" if rep.mmproj is not None else ""
    print(f"{args.path}: OK: {len(rep.files)} weight file(s){with_mmproj}, {rep.tensors} tensors, shapes {implied}; "
          f"{hashes}")
    return 0
