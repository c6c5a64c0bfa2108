"""A checkpoint directory's files and tensors, checked against its config before anything is read.

`index_checkpoint` finds the safetensors files (one file, or shards listed in an index), maps the official keys
(`model.language_model.*` for the VLM layout, `model.*` for text-only) to our parameter names, and checks every
name, shape and dtype the config implies; `weights.load_model` then reads into place what it lists, and
`CheckpointTensors` reads it band by band without building the model (the ONNX export's source).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError
from .model.qwen35 import Qwen35ForCausalLM
from .safetensors_io import SafetensorsReader, TensorEntry, read_header

log = logging.getLogger("qwen35")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
VLM_TEXT_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."

@dataclass
class CheckpointInfo:
    """What was found on disk; kept on the model as `model.checkpoint_info`."""

    path: Path
    files: list[Path]
    layout: str  # "vlm" or "text"
    skipped: list[str] = field(default_factory=list)  # checkpoint keys not loaded (vision tower, tied head)
    nbytes: int = 0


def read_weight_map(index: Path) -> dict[str, str]:
    """A safetensors index's weight map (tensor -> shard file), every shard a file name inside the checkpoint
    directory: anything else is a CheckpointError naming the index and the tensor (not a TypeError joining a
    path to a number, nor a read of a file outside the checkpoint). verify reads indexes through this too."""
    from .manifest import file_name_problem

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
    for key, shard in weight_map.items():
        if problem := file_name_problem(shard):
            raise CheckpointError(f"{index}: weight_map entry '{key}': {problem}")
    return weight_map


def find_weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint, and the index's weight map when there is one."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_weight_map(index)
        files = []
        for name in dict.fromkeys(weight_map.values()):
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{index} lists shard '{name}', which is missing from {path}")
            files.append(f)
        return files, weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards, None
    raise CheckpointError(f"no weights found in {path}: expected {SINGLE_FILE} or {INDEX_FILE}")


def read_checkpoint_entries(path: Path) -> tuple[dict[str, TensorEntry], list[Path]]:
    files, weight_map = find_weight_files(path)
    entries: dict[str, TensorEntry] = {}
    for f in files:
        for name, e in read_header(f).items():
            if name in entries:
                raise CheckpointError(f"tensor '{name}' appears in both {entries[name].file.name} and {f.name}")
            entries[name] = e
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in entries:
                raise CheckpointError(f"{INDEX_FILE} maps tensor '{name}' to '{shard}', which does not contain it")
    return entries, files


def to_module_name(key: str, layout: str) -> str | None:
    """Checkpoint key -> our parameter name; None for keys we keep on disk only (vision tower)."""
    if key.startswith(VISION_PREFIX):
        return None
    if layout == "vlm" and key.startswith(VLM_TEXT_PREFIX):
        return "model." + key[len(VLM_TEXT_PREFIX):]
    return key


def count_mtp_layers(keys) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"mtp\.layers\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def check_mtp_layers(config: ModelConfig, found: int) -> None:
    """A checkpoint's MTP layers (count_mtp_layers; none is fine: many conversions drop the head) against the
    config's count."""
    if found and config.mtp_num_hidden_layers and found != config.mtp_num_hidden_layers:
        raise CheckpointError(f"config says mtp_num_hidden_layers={config.mtp_num_hidden_layers} but the "
                              f"checkpoint has {found} mtp.layers")


def meta_model(config: ModelConfig, mtp_layers: int = 0) -> Qwen35ForCausalLM:
    """The model's skeleton on the meta device: its parameter names and shapes, no memory, no init."""
    with torch.device("meta"), skip_init():
        return Qwen35ForCausalLM(config, mtp_layers=mtp_layers)


def parameter_shapes(config: ModelConfig, mtp_layers: int = 0) -> dict[str, tuple[int, ...]]:
    """Every parameter the config implies (with `mtp_layers` MTP layers), name -> shape: what a checkpoint
    of it must hold."""
    return {n: tuple(p.shape) for n, p in meta_model(config, mtp_layers).named_parameters()}


def check_not_adapters(path: str | Path) -> None:
    """A `qwen35 train --quant` output holds the LoRA adapters alone (lora.safetensors + adapter_config.json):
    say so and name what to load, where a missing config.json would only say it is missing."""
    path = Path(path)
    if not (path.is_dir() and not (path / "config.json").is_file() and (path / "adapter_config.json").is_file()):
        return
    try:
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError, AttributeError):
        base = None
    on = f" (their base: {base})" if base else ""
    if (path / "merged" / "config.json").is_file():
        fix = f"load {path / 'merged'}, the merged model"
    else:
        fix = (f"write the merged model with `qwen35 train ... --out {path} --resume --merge bf16` and load "
               f"{path / 'merged'}")
    raise CheckpointError(f"{path} holds LoRA adapters only{on}, not a model: {fix}")


@dataclass
class CheckpointIndex:
    """A checkpoint directory's tensors checked against its config: our parameter names -> file entries."""

    config: ModelConfig
    info: CheckpointInfo
    model: Qwen35ForCausalLM  # on the meta device: names and shapes
    by_name: dict[str, TensorEntry]
    vision: dict[str, TensorEntry]
    qcfg: dict | None
    stored: dict[str, str]  # parameter -> layout, for a quantized checkpoint's matrices
    shapes: dict[str, tuple[int, ...]]
    wanted: list[str]  # the entries to read (NAME.qs / NAME.d for the stored matrices)


def index_checkpoint(path: Path) -> CheckpointIndex:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; point at the folder holding config.json and weights")
    check_not_adapters(path)
    config = ModelConfig.from_file(path)
    entries, files = read_checkpoint_entries(path)

    layout = "vlm" if any(k.startswith(VLM_TEXT_PREFIX) for k in entries) else "text"
    info = CheckpointInfo(path=path, files=files, layout=layout)
    by_name: dict[str, TensorEntry] = {}
    vision: dict[str, TensorEntry] = {}
    for key, e in entries.items():
        name = to_module_name(key, layout)
        if name is not None:
            by_name[name] = e
        elif key.startswith(VISION_PREFIX) and config.vision_config is not None:
            vision[key[len(VISION_PREFIX):]] = e
        else:
            info.skipped.append(key)

    mtp_layers = count_mtp_layers(by_name)
    check_mtp_layers(config, mtp_layers)
    if "lm_head.weight" not in by_name and "lm_head.weight.qs" not in by_name and not config.tie_word_embeddings:
        log.warning("%s: no lm_head.weight and tie_word_embeddings=false; using the embedding as the head", path)
        config = _replace(config, tie_word_embeddings=True)
    if config.tie_word_embeddings and "lm_head.weight" in by_name:
        info.skipped.append(disk_key("lm_head.weight", by_name))
        del by_name["lm_head.weight"]

    model = meta_model(config, mtp_layers)

    from .quant.checkpoint import read_quant_config

    qcfg = read_quant_config(path)
    stored = qcfg["tensors"] if qcfg else {}
    expected = dict(model.named_parameters())
    bad = [n for n in stored if n not in expected]
    if bad:
        raise CheckpointError(f"{path}: quantization_config names '{bad[0]}', which this model does not have")
    wanted = [n for n in expected if n not in stored] + [n + s for n in stored for s in (".qs", ".d")]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise CheckpointError(f"{path}: missing tensor '{checkpoint_key(missing[0], layout)}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    wanted_set = set(wanted)
    unexpected = [n for n in by_name if n not in wanted_set]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor '{disk_key(unexpected[0], by_name)}'"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    shapes = {n: tuple(p.shape) for n, p in expected.items()}
    return CheckpointIndex(config, info, model, by_name, vision, qcfg, stored, shapes, wanted)


def check_entry(path: Path, e: TensorEntry, shape: tuple[int, ...]) -> None:
    if tuple(e.shape) != shape:
        raise CheckpointError(f"{path}: shape mismatch for '{e.name}': checkpoint has {list(e.shape)}, "
                              f"the config implies {list(shape)}")
    if not e.dtype.is_floating_point:
        raise CheckpointError(f"{path}: tensor '{e.name}' has non-float dtype {e.dtype}")


class CheckpointTensors:
    """A checkpoint directory's text-model parameters read on demand, a band of rows at a time, without
    loading the model (the ONNX export's source: peak memory one band, whatever the model's size).
    `shapes`: parameter name -> shape; `rows(name, a, b)`: rows a..b-1 as stored (a quantized checkpoint's
    matrices dequantized to fp32). Checked like `load_model` (names, shapes, dtypes)."""

    def __init__(self, path: str | Path):
        idx = index_checkpoint(Path(path))
        self.path, self.config, self._idx = Path(path), idx.config, idx
        self.shapes = {n: s for n, s in idx.shapes.items() if not n.startswith("mtp.")}
        self._readers: dict[Path, SafetensorsReader] = {}

    def _read(self, e: TensorEntry) -> torch.Tensor:
        reader = self._readers.get(e.file) or self._readers.setdefault(e.file, SafetensorsReader(e.file))
        return reader.read(e)

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        idx = self._idx
        if not 0 <= a <= b <= idx.shapes[name][0]:
            raise IndexError(f"rows {a}..{b} of '{name}', which has {idx.shapes[name][0]}")
        if name in idx.stored:
            from .quant.checkpoint import check_stored
            from .quant.formats import dequantize

            e_qs, e_d = idx.by_name[name + ".qs"], idx.by_name[name + ".d"]
            check_stored(self.path, name, e_qs, e_d, idx.stored[name], *idx.shapes[name])
            d = self._read(row_band(e_d, a, b)) if e_d.nbytes else torch.empty(b - a, 0, dtype=torch.float16)
            return dequantize(idx.stored[name], self._read(row_band(e_qs, a, b)), d)
        e = idx.by_name[name]
        check_entry(self.path, e, idx.shapes[name])
        return self._read(row_band(e, a, b))

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


@contextlib.contextmanager
def skip_init():
    """Skip torch's random init while building on the meta device: every value is about to be read from
    disk, and init on meta tensors drags in torch._dynamo (a 1 s import)."""
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def row_band(e: TensorEntry, a: int, b: int) -> TensorEntry:
    """Rows a..b-1 of a stored matrix, as an entry of their own (rows are contiguous on disk)."""
    row = e.nbytes // e.shape[0]
    return replace(e, shape=(b - a, *e.shape[1:]), start=e.start + a * row, nbytes=(b - a) * row)


def checkpoint_key(name: str, layout: str) -> str:
    if layout == "vlm" and name.startswith("model."):
        return VLM_TEXT_PREFIX + name[len("model."):]
    return name


def disk_key(name: str, by_name: dict[str, TensorEntry]) -> str:
    return by_name[name].name


def _replace(config: ModelConfig, **changes) -> ModelConfig:
    return replace(config, **changes)
