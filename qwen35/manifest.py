"""A checkpoint's manifest: every file's size and hash, so a preserved copy can be checked byte for byte later
(`qwen35 verify`). `qwen35 download` writes it from the Hugging Face hub's own records, before the first byte
arrives: the sha256 of LFS files (weights, tokenizer.json) and the git blob SHA-1 of the small ones kept in
git (config.json, ...), which are the hashes the hub publishes. `qwen35 verify --write-manifest` writes one
for a directory already on disk (sha256 of every file).

    {"format": "qwen35-manifest/1", "source": "hub:REPO@COMMIT" | "local",
     "files": {"config.json": {"size": 1039, "git_sha1": "..."}, "model.safetensors": {"size": ..., "sha256": "..."}}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import CheckpointError

MANIFEST = "qwen35-manifest.json"
FORMAT = "qwen35-manifest/1"
CHUNK = 16 * 2**20


def file_hash(path: Path, kind: str) -> str:
    """sha256 of the file, or its git blob SHA-1 (sha1 over b"blob <size>\\0" + bytes), streamed."""
    if kind == "sha256":
        h = hashlib.sha256()
    elif kind == "git_sha1":
        h = hashlib.sha1()
        h.update(b"blob %d\0" % path.stat().st_size)
    else:
        raise CheckpointError(f"unknown hash kind {kind!r} in manifest (sha256 or git_sha1)")
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path) -> dict:
    try:
        m = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"manifest not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid manifest ({e})") from None
    files = m.get("files") if isinstance(m, dict) else None
    if m.get("format") != FORMAT or not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and ("sha256" in v or "git_sha1" in v)
            for v in files.values()):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest (needs 'files': {{name: {{size, sha256 | git_sha1}}}})")
    return m


def write_manifest(path: Path, files: dict[str, dict], source: str) -> Path:
    out = {"format": FORMAT, "source": source, "files": dict(sorted(files.items()))}
    Path(path).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return Path(path)


def local_manifest(root: Path, files: list[Path]) -> dict[str, dict]:
    """{name relative to root: {size, sha256}} for files on disk."""
    return {f.relative_to(root).as_posix(): {"size": f.stat().st_size, "sha256": file_hash(f, "sha256")}
            for f in files}


def hub_manifest(siblings) -> dict[str, dict]:
    """{file: {size, sha256 | git_sha1}} from the hub's file records (huggingface_hub RepoSibling, fetched with
    files_metadata=True): LFS files by their sha256, the others by their git blob id."""
    out = {}
    for s in siblings:
        if s.lfs is not None:
            out[s.rfilename] = {"size": int(s.lfs.size), "sha256": s.lfs.sha256}
        elif s.blob_id and s.size is not None:
            out[s.rfilename] = {"size": int(s.size), "git_sha1": s.blob_id}
        else:
            raise CheckpointError(f"the hub gave no hash for '{s.rfilename}' (was files_metadata requested?)")
    return out


def check_files(root: Path, manifest: dict, say=None) -> list[str]:
    """Every file the manifest names, against its size and hash: the problems found (empty when all match)."""
    problems = []
    for name, want in manifest["files"].items():
        f = root / name
        if not f.is_file():
            problems.append(f"missing: {name} (listed in the manifest)")
            continue
        size = f.stat().st_size
        if size != want["size"]:
            problems.append(f"corrupt: {name} has {size} bytes, the manifest says {want['size']}")
            continue
        kind = "sha256" if "sha256" in want else "git_sha1"
        if say:
            say(f"hashing {name} ({size / 2**20:.1f} MiB)")
        got = file_hash(f, kind)
        if got != want[kind]:
            problems.append(f"corrupt: {name}: {kind} {got} differs from the manifest's {want[kind]}")
    return problems
