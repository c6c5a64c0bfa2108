"""Check a preserved checkpoint end to end, without loading it: `qwen35 verify PATH` (a Hugging Face directory
or a GGUF file, one part of a split naming all of them).

- Files: every shard the safetensors index names is present (every part of a split GGUF).
- Headers: every file's header parses, each tensor's byte range lies inside its file (a truncated file shows
  here) and matches its dtype and shape; every tensor the index maps to a shard is in that shard.
- Shapes: the tensors are exactly those the config implies (none missing, none unexpected), of its shapes.
- Hashes: each file's size and hash match the manifest (manifest.py): `--manifest FILE`, or the
  qwen35-manifest.json `qwen35 download` wrote beside the weights. Without one, hashes are not checked (said).
An mmproj GGUF (a vision tower, gguf/mmproj.py) is checked on its own: its clip metadata, and the tensors that
metadata implies (none missing, none unexpected, each of its shape and of a type that can be read). A GGUF's
check takes in the mmproj load_model would attach to it (mmproj-<stem>.gguf beside it): checked against the text
model's width, hashed and recorded in a manifest with it.
Returns every problem found, not only the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import Qwen35Error
from .manifest import MANIFEST, check_files, read_manifest


@dataclass
class Report:
    path: Path
    problems: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # weight files found (and checked)
    tensors: int = 0
    hashed: int = 0  # files checked against a manifest
    manifest: Path | None = None
    kind: str = "model"  # or "mmproj": a vision tower's file, checked against its own metadata
    mmproj: Path | None = None  # the mmproj found beside a GGUF (load_model attaches it), checked with it

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path, manifest: str | Path | None = None, say=None) -> Report:
    from .gguf.reader import is_gguf_path
    path = Path(path)
    rep = Report(path)
    if not path.exists():
        rep.problems.append(f"missing: {path} does not exist")
        return rep
    if is_gguf_path(path):
        _gguf(path, rep)
        root = path.parent
    elif path.is_dir():
        _directory(path, rep)
        root = path
    else:
        rep.problems.append(f"{path}: neither a checkpoint directory nor a .gguf file")
        return rep
    m = Path(manifest) if manifest is not None else (root / MANIFEST if (root / MANIFEST).is_file() else None)
    if m is not None:
        rep.manifest = m
        try:
            man = read_manifest(m)
        except Qwen35Error as e:
            rep.problems.append(str(e))
            return rep
        if is_gguf_path(path):  # only this model's parts (a GGUF repo holds many quantizations)
            names = {p.name for p in rep.files} | {path.name}
            man = {**man, "files": {k: v for k, v in man["files"].items() if k in names}}
            if not man["files"]:
                rep.problems.append(f"{m} lists no file of {path.name}")
        rep.problems += check_files(root, man, say)
        rep.hashed = len(man["files"])
    return rep


def _directory(path: Path, rep: Report) -> None:
    from .checkpoint_index import (
        INDEX_FILE,
        SINGLE_FILE,
        check_entry,
        check_mtp_layers,
        count_mtp_layers,
        parameter_shapes,
        read_weight_map,
        to_module_name,
    )
    from .config import ModelConfig
    from .safetensors_io import read_header

    config = None
    try:
        config = ModelConfig.from_file(path)
    except Qwen35Error as e:
        rep.problems.append(f"config: {e}")
    index, weight_map = path / INDEX_FILE, None
    if index.is_file():
        try:
            weight_map = read_weight_map(index)
        except Qwen35Error as e:
            rep.problems.append(f"corrupt: {e}")
    if weight_map is not None:
        names = list(dict.fromkeys(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        names = sorted(p.name for p in path.glob("*.safetensors"))
    if not names:
        rep.problems.append(f"missing: no weights in {path} ({SINGLE_FILE} or {INDEX_FILE})")
    entries, held, unreadable = {}, {}, 0
    for name in names:
        f = path / name
        if not f.is_file():
            rep.problems.append(f"missing: {name}" + (f" (named by {INDEX_FILE})" if weight_map is not None else ""))
            unreadable += 1
            continue
        rep.files.append(f)
        try:
            header = read_header(f)
        except Qwen35Error as e:
            rep.problems.append(f"corrupt: {e}")
            unreadable += 1
            continue
        held[name] = set(header)
        for k, e in header.items():
            if k in entries:
                rep.problems.append(f"corrupt: tensor '{k}' is in both {entries[k].file.name} and {name}")
            entries[k] = e
    rep.tensors = len(entries)
    for k, shard in (weight_map or {}).items():
        if shard in held and k not in held[shard]:
            rep.problems.append(f"corrupt: {INDEX_FILE} maps '{k}' to {shard}, which does not hold it")
    if config is None or not entries:
        return
    layout = "vlm" if any(k.startswith("model.language_model.") for k in entries) else "text"
    shapes, by_name = {}, {}
    for k, e in entries.items():
        n = to_module_name(k, layout)
        if n is not None:
            shapes[n], by_name[n] = (k, tuple(e.shape)), e
    mtp_layers = count_mtp_layers(shapes)
    _check(rep, "config", check_mtp_layers, config, mtp_layers)
    want = parameter_shapes(config, mtp_layers)
    stored = _stored_quant(path, rep)
    if stored is None:  # which tensors to expect is unknown: the config's problem explains every mismatch
        return
    complete = unreadable == 0
    for n in stored:
        if n not in want:
            rep.problems.append(f"config: quantization_config names '{n}', which this model does not have")
    for n, shape in want.items():
        if n in stored:
            _check_quantized(path, n, stored[n], shape, by_name, complete, rep)
            continue
        if n == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if n not in shapes:
            if complete:  # a missing or unreadable shard already explains missing tensors
                rep.problems.append(f"missing tensor: '{n}' (the config implies it)")
        elif shapes[n][1] != shape:
            rep.problems.append(f"shape: '{shapes[n][0]}' is {list(shapes[n][1])}, the config implies {list(shape)}")
        else:
            _check(rep, "dtype", check_entry, path, by_name[n], shape)
    for n, (k, _) in shapes.items():
        base = n.removesuffix(".qs").removesuffix(".d")
        if n not in want and not (base in stored and base != n):
            rep.problems.append(f"unexpected tensor: '{k}' (not part of this config's model)")


def _check(rep: Report, kind: str, check, *args) -> None:
    """Run one of the loader's checks; what it raises is a problem of this kind."""
    try:
        check(*args)
    except Qwen35Error as e:
        rep.problems.append(f"{kind}: {e}")


def _check_quantized(path: Path, name: str, scheme: str, shape, by_name: dict, complete: bool, rep: Report) -> None:
    """A matrix the quantization_config names: its .qs and .d present, not stored plain as well, each of the
    layout and dtype load_model checks (quant.checkpoint.check_stored), its scales finite."""
    from .quant.checkpoint import check_stored

    if name in by_name:
        rep.problems.append(f"unexpected tensor: '{by_name[name].name}' (quantization_config stores it quantized)")
    qs, d = by_name.get(name + ".qs"), by_name.get(name + ".d")
    if qs is None or d is None:
        if complete:
            rep.problems.append(f"missing tensor: '{name}{'.qs' if qs is None else '.d'}' (quantization_config "
                                f"names '{name}')")
        return
    _check(rep, "quantized", check_stored, path, name, qs, d, scheme, *shape)


def _stored_quant(path: Path, rep: Report) -> dict | None:
    """The quantization_config's tensors ({} when unquantized), checked as load_model checks them (None, and
    a problem, where it refuses them)."""
    from .quant.checkpoint import read_quant_config

    try:
        q = read_quant_config(path)
    except Qwen35Error as e:
        rep.problems.append(f"config: {e}")
        return None
    return q["tensors"] if q else {}


def _gguf(path: Path, rep: Report) -> None:
    from .config import ModelConfig
    from .gguf import mmproj, open_gguf
    from .gguf.loader import check_tensors
    from .gguf.metadata import config_dict
    from .gguf.reader import split_parts

    try:
        rep.files = split_parts(path)
    except Qwen35Error as e:
        rep.problems.append(f"missing: {e}")
        return
    try:
        f = open_gguf(path)
    except Qwen35Error as e:
        rep.problems.append(f"corrupt: {e}")
        return
    rep.tensors = len(f.tensors)
    if f.get("general.architecture") == mmproj.ARCH:
        rep.kind = "mmproj"
        rep.problems += mmproj.check_tensors(f)
        return
    hidden = None
    try:
        rep.problems += check_tensors(f)
        hidden = ModelConfig.from_hf(config_dict(f), source=str(f.path)).hidden_size
    except Qwen35Error as e:
        rep.problems.append(f"config: {e}")
    found = mmproj.find_mmproj(path)
    if found is None:
        return
    # what load_model attaches to the model is checked with it (against its hidden size) and hashed with it
    rep.mmproj = found
    rep.files.append(found)
    try:
        g = open_gguf(found)
    except Qwen35Error as e:
        rep.problems.append(f"corrupt: {e}")
        return
    rep.tensors += len(g.tensors)
    rep.problems += [p if p.startswith("config: ") else f"{found.name}: {p}" for p in mmproj.check_tensors(g, hidden)]
