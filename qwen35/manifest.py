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
from pathlib import Path, PurePosixPath
from string import hexdigits

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


HASH_HEX = {"sha256": 64, "git_sha1": 40}  # hex digits of each hash kind


def read_manifest(path: Path) -> dict:
    """The manifest at `path`, checked entry by entry (CheckpointError naming the file and entry at fault);
    hashes are lowercased, as file_hash writes them."""
    try:
        m = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"manifest not found: {path}") from None
    except OSError as e:  # a folder, no permission
        raise CheckpointError(f"{path}: cannot read the manifest ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid manifest ({e})") from None
    # the shape first: a JSON list or string has no .get
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest (needs 'files': {{name: {{size, sha256 | git_sha1}}}})")
    for name, entry in m["files"].items():
        problem = file_name_problem(name) or _entry_problem(entry)
        if problem:
            raise CheckpointError(f"{path}: entry '{name}': {problem}")
    return m


def file_name_problem(name: object) -> str | None:
    """Why a file name from a checkpoint's own records (manifest, safetensors index) cannot be one of its
    files, or None: names are relative to the checkpoint directory and never leave it (a manifest naming
    '../x' or '/etc/x' would have verify read, and vouch for, files that are not the checkpoint's)."""
    if not isinstance(name, str):
        return f"{json.dumps(name)} is not a file name"
    p = PurePosixPath(name.replace("\\", "/"))  # on Windows a backslash separates: '..\x' leaves too
    if not p.parts:  # '', '.', './'
        return "not a file name"
    if p.is_absolute() or ".." in p.parts:
        return "names a file outside the checkpoint directory (names are relative, without '..')"
    return None


def _entry_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return "expected {size, sha256 | git_sha1}"
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:  # JSON true is an int in Python
        return f"'size' must be a non-negative integer, got {json.dumps(size)}"
    kinds = [k for k in HASH_HEX if k in entry]
    if not kinds:
        return "no hash ('sha256' or 'git_sha1')"
    for kind in kinds:
        h = entry[kind]
        if not (isinstance(h, str) and len(h) == HASH_HEX[kind] and all(c in hexdigits for c in h)):
            return f"'{kind}' must be {HASH_HEX[kind]} hex digits, got {json.dumps(h)[:80]}"
        entry[kind] = h.lower()
    return None


def write_manifest(path: Path, files: dict[str, dict], source: str) -> Path:
    out = {"format": FORMAT, "source": source, "files": dict(sorted(files.items()))}
    try:
        Path(path).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    except OSError as e:  # no such folder, a folder in the way, no permission, a full disk
        raise CheckpointError(f"{path}: cannot write the manifest ({e.strerror})") from None
    return Path(path)


def add_to_manifest(path: Path, files: dict[str, dict], source: str) -> Path:
    """Write `files` into the manifest at `path`, keeping the entries it already holds: a second download
    into the same directory (`--include` another file) must not drop the hashes of the first, or verify would
    stop checking those files. Only records of the same source merge: files of another repo or commit (or a
    `local` manifest) in one directory would mix checkpoints under one manifest, so that is refused."""
    path = Path(path)
    if not path.is_file():
        return write_manifest(path, files, source)
    old = read_manifest(path)
    if old.get("source") != source:
        hint = ""
        if str(old.get("source", "")).rpartition("@")[0] == source.rpartition("@")[0]:
            hint = f" (--revision {old['source'].rpartition('@')[2]} adds files of the commit it holds)"
        raise CheckpointError(f"{path} records files of {old.get('source')!r}, not {source!r}: download into "
                              f"another directory, or delete {path.name} there to start over{hint}")
    return write_manifest(path, {**old["files"], **files}, source)


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
