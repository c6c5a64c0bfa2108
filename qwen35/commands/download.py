"""Download a checkpoint from the Hugging Face hub and record its hashes: `qwen35 download REPO DIR`.

A thin wrapper over huggingface_hub: the file list and the hub's own hashes come first (model_info with
files_metadata: sha256 for LFS files, the git blob SHA-1 for the small ones) and are written to
DIR/qwen35-manifest.json before any download, then each file is fetched with hf_hub_download (which resumes
a partial file), then `qwen35 verify DIR` checks the result. Run it again to resume. A manifest already in DIR
keeps its entries (a later `--include` adds files to it) when it records the same repo and commit; one of
another source is refused rather than mixed or replaced. So is a DIR holding checkpoint files that its manifest
does not list (another model's config, shards or index: they would stay beside the download, and an old
index would win at load).
"""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path


def setup_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", help="Hugging Face repo id, e.g. Qwen/Qwen3.5-0.8B")
    p.add_argument("dir", type=Path, help="directory to download into (created)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--include", action="append", default=None, metavar="GLOB",
                   help="only files matching this pattern (repeatable), e.g. '*Q4_K_M*.gguf' in a GGUF repo")


def main(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi, hf_hub_download

    from ..errors import CheckpointError
    from ..manifest import MANIFEST, add_to_manifest, hub_manifest, read_manifest
    from ..verify import verify
    from .common import check_no_checkpoint, check_output_dir, checkpoint_files

    # before the hub is asked: a DIR that cannot be one, or that holds another checkpoint
    check_output_dir(args.dir)
    if (args.dir / MANIFEST).is_file():  # a download to resume or add to: only the files it lists may be there
        listed = read_manifest(args.dir / MANIFEST)["files"]
        check_no_checkpoint(args.dir, [n for n in checkpoint_files(args.dir) if n not in listed],
                            f"holds checkpoint files its {MANIFEST} does not list")
    else:
        check_no_checkpoint(args.dir)
    try:
        info = HfApi().model_info(args.repo, revision=args.revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all mean: nothing to fetch
        raise CheckpointError(f"could not read '{args.repo}' from the Hugging Face hub: {e}") from None
    siblings = [s for s in info.siblings or []
                if not args.include or any(fnmatch.fnmatch(s.rfilename, g) for g in args.include)]
    if not siblings:
        raise CheckpointError(f"'{args.repo}' has no files" + (f" matching {args.include}" if args.include else ""))
    files = hub_manifest(siblings)
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{args.dir}: cannot create it ({e.strerror})") from None
    # merged, never replaced: verify checks what the manifest lists, so a dropped entry is an unchecked file
    manifest = add_to_manifest(args.dir / MANIFEST, files, f"hub:{args.repo}@{info.sha}")
    total = sum(v["size"] for v in files.values())
    print(f"{args.repo}@{info.sha}: {len(files)} files, {total / 2**30:.2f} GiB; hashes in {manifest}")
    for name in files:
        try:
            hf_hub_download(args.repo, name, revision=info.sha, local_dir=args.dir)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"downloading {name} from '{args.repo}' failed: {e} (run again to resume)") from None
    gguf = [n for n in files if n.endswith(".gguf")]
    target = args.dir / gguf[0] if gguf and len({n.split("-0000")[0] for n in gguf}) == 1 else args.dir
    if target == args.dir and gguf:  # several GGUF models: hashes only (each is checked by `verify FILE`)
        from ..manifest import check_files

        listed = read_manifest(manifest)["files"]  # this download's and those of earlier ones
        problems, checked = check_files(args.dir, {"files": listed}), len(listed)
    else:
        rep = verify(target, manifest)
        problems, checked = rep.problems, rep.hashed
    for p in problems:
        print(p)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s) after download")
        return 1
    print(f"{args.dir}: downloaded and verified ({checked} files match the hub's hashes)")
    return 0
