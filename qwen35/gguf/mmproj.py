"""The vision tower as llama.cpp's mmproj GGUF, out and in: llama.cpp keeps a Qwen3.5 tower in its own file
(architecture `clip`, projector `qwen3vl_merger`) that its mtmd library loads beside the text GGUF.

Written as llama.cpp's converter writes it (`convert_hf_to_gguf.py --mmproj`, class Qwen3VLVisionModel;
re-derived here, not copied), so the two files have the same keys, tensors and types:
- names: `patch_embed.proj` -> `v.patch_embd`, `pos_embed` -> `v.position_embd`, block i's `norm1` / `norm2` /
  `attn.qkv` / `attn.proj` / `mlp.linear_fc1` / `mlp.linear_fc2` -> `v.blk.i.ln1` / `ln2` / `attn_qkv` /
  `attn_out` / `ffn_up` / `ffn_down`, `merger.norm` -> `v.post_ln`, `merger.linear_fc1` / `linear_fc2` ->
  `mm.0` / `mm.2`;
- the Conv3d patch kernel [H, C, 2, P, P] is cut along time into `v.patch_embd.weight` (frame 0) and
  `v.patch_embd.weight.1` (frame 1), the only transform; reading stacks them back;
- types: biases, norms, the patch kernel and the position table F32 always; the matrices F32 (`f32`), BF16
  (`bf16`), or Q8_0 (`q8_0`, F16 where a row is not a whole number of 32-blocks, as the converter falls back).
  The converter has no q4_0 / q4_k_m output: for those the tower stays BF16 (file type bf16);
- metadata `clip.*`: the tower's sizes, image_size = sqrt(positions) * patch, the processor's mean / std,
  projection_dim = the text model's hidden size and layer_norm_epsilon = the text config's rms_norm_eps (the
  converter's choices, kept so the files compare equal; qwen35's LayerNorms use 1e-6 as the tower does).
Reading takes the sizes from the metadata and the tensors, the processor's patch size, merge size and mean /
std from the metadata (pixel limits are not in the file: the Qwen3.5 defaults), the vision rotary base 10000
(llama.cpp hard-codes it), and the placeholder token ids from the text model's tokenizer.

Found, not only named: load_model attaches `mmproj-<stem>.gguf` beside a GGUF it is given no mmproj for
(find_mmproj), as llama.cpp front ends (LM Studio, Ollama) pair the two files; `qwen35 info` describes an mmproj
and `qwen35 verify` checks one (check_tensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError

ARCH = "clip"
PROJECTOR = "qwen3vl_merger"
PATCH = "patch_embed.proj.weight"  # the one tensor written as two (v.patch_embd.weight, v.patch_embd.weight.1)
GLOBAL = {
    "patch_embed.proj.bias": "v.patch_embd.bias",
    "pos_embed.weight": "v.position_embd.weight",
    "merger.norm.weight": "v.post_ln.weight",
    "merger.norm.bias": "v.post_ln.bias",
    "merger.linear_fc1.weight": "mm.0.weight",
    "merger.linear_fc1.bias": "mm.0.bias",
    "merger.linear_fc2.weight": "mm.2.weight",
    "merger.linear_fc2.bias": "mm.2.bias",
}
BLOCK = {  # after "blocks.{i}." -> after "v.blk.{i}."
    "norm1": "ln1", "norm2": "ln2", "attn.qkv": "attn_qkv", "attn.proj": "attn_out",
    "mlp.linear_fc1": "ffn_up", "mlp.linear_fc2": "ffn_down",
}
# file type -> (general.file_type, the matrices' GGML type): q4_0 / q4_k_m have no converter output of their own
FILE_TYPES = {"f32": (0, "F32"), "bf16": (32, "BF16"), "q8_0": (7, "Q8_0"), "q4_0": (32, "BF16"),
              "q4_k_m": (32, "BF16")}
# the placeholder tokens, by the text the chat template writes (ModelConfig's VISION_TOKEN_KEYS order)
PLACEHOLDERS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def mmproj_path(out: str | Path) -> Path:
    """Where `qwen35 export` puts the mmproj of OUT.gguf: `mmproj-<OUT stem>.gguf` beside it, the name llama.cpp
    and LM Studio look for."""
    out = Path(out)
    return out.with_name(f"mmproj-{out.stem}.gguf")


def find_mmproj(model: str | Path) -> Path | None:
    """The mmproj load_model attaches to the GGUF `model` when it is given none: `mmproj-<stem>.gguf` in the
    same folder (for a split GGUF `<base>-0000K-of-0000N.gguf`, any part: `mmproj-<base>.gguf`), where that file
    exists; else None. None for a checkpoint directory too: it carries its own tower."""
    from .reader import SPLIT_RE, is_gguf_path

    p = Path(model)
    if not (is_gguf_path(p) and p.is_file()):
        return None
    m = SPLIT_RE.match(p.name)
    found = p.with_name(f"mmproj-{m.group('stem') if m else p.stem}.gguf")
    return found if found.is_file() and found.name != p.name else None


def gguf_names(name: str, temporal: int = 2) -> list[str]:
    """llama.cpp's tensor name(s) for one parameter of the tower (two for the patch kernel)."""
    if name == PATCH:
        return ["v.patch_embd.weight", *(f"v.patch_embd.weight.{t}" for t in range(1, temporal))]
    if name in GLOBAL:
        return [GLOBAL[name]]
    head, _, rest = name.partition(".")
    i, _, rest = rest.partition(".")
    module, _, kind = rest.rpartition(".")
    if head != "blocks" or not i.isdigit() or module not in BLOCK:
        raise KeyError(f"no mmproj name for vision parameter '{name}'")
    return [f"v.blk.{i}.{BLOCK[module]}.{kind}"]


def tensor_plan(shapes: dict[str, tuple[int, ...]], file_type: str) -> list[tuple[str, str, str]]:
    """(our name, llama.cpp name, GGML type) of every tensor of a `file_type` mmproj of a tower with these
    parameter shapes, in the converter's order (the checkpoint's sorted keys)."""
    if file_type not in FILE_TYPES:
        raise CheckpointError(f"unknown GGUF type {file_type!r}; use one of {', '.join(FILE_TYPES)}")
    matrix = FILE_TYPES[file_type][1]
    out = []
    for n in sorted(shapes):
        shape = shapes[n]
        temporal = shape[2] if n == PATCH else 1
        for g in gguf_names(n, temporal):
            if len(shape) != 2 or n == "pos_embed.weight":
                kind = "F32"  # 1-D, the patch kernel (the converter forces it) and the position table
            elif matrix == "Q8_0" and shape[1] % 32:
                kind = "F16"  # the converter's fallback where Q8_0 cannot cut a row into blocks
            else:
                kind = matrix
            out.append((n, g, kind))
    return out


def export_mmproj(model, out: str | Path, file_type: str = "bf16", name: str | None = None,
                  progress: bool = False) -> Path:
    """Write `model.visual` (the vision tower) to `out` as llama.cpp's mmproj GGUF. `model.config` gives the
    text side (projection_dim, the epsilon) and `model.visual.processor` the mean / std. file_type: as
    export_gguf's (q4_0 / q4_k_m keep the tower BF16). name: general.name (default: the file's stem). Written
    under a temporary name and renamed (writer._write). Returns the file written."""
    from gguf import GGMLQuantizationType, GGUFType, GGUFWriter
    from gguf.quants import quantize
    from gguf.utility import size_label

    from .writer import _write

    out = Path(out)
    tower = getattr(model, "visual", None)
    if tower is None:
        raise CheckpointError(f"{out}: the model has no vision tower, so there is no mmproj to write")
    vc, proc = tower.config, tower.processor
    if vc.temporal_patch_size != 2:  # llama.cpp reads exactly two patch kernels
        raise CheckpointError(f"cannot write an mmproj of a tower with temporal_patch_size {vc.temporal_patch_size}: "
                              "llama.cpp's qwen3vl_merger takes 2")
    params = {n: p.detach() for n, p in tower.named_parameters()}
    plan = tensor_plan({n: tuple(p.shape) for n, p in params.items()}, file_type)

    w = GGUFWriter(None, ARCH)
    w.add_type(GGUFType.MMPROJ)
    w.add_name(name or out.stem)
    w.add_size_label(size_label(sum(p.numel() for p in params.values()), 0, 0, 0))
    w.add_file_type(FILE_TYPES[file_type][0])
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(model.config.hidden_size)
    w.add_vision_image_size(int(vc.num_position_embeddings**0.5 * vc.patch_size))  # as the converter rounds
    w.add_vision_patch_size(vc.patch_size)
    w.add_vision_embedding_length(vc.hidden_size)
    w.add_vision_feed_forward_length(vc.intermediate_size)
    w.add_vision_block_count(vc.depth)
    w.add_vision_head_count(vc.num_heads)
    w.add_vision_image_mean(list(proc.image_mean))
    w.add_vision_image_std(list(proc.image_std))
    w.add_clip_projector_type(PROJECTOR)
    w.add_vision_use_gelu(True)
    w.add_vision_spatial_merge_size(vc.spatial_merge_size)
    w.add_vision_attention_layernorm_eps(model.config.rms_norm_eps)
    w.add_vision_is_deepstack_layers([False] * vc.depth)
    w.add_quantization_version(2)

    for n, g, kind in plan:
        t = params[n]
        if n == PATCH:  # frame k of the kernel: `.weight` is frame 0, `.weight.k` frame k
            t = t[:, :, 0 if g.endswith(".weight") else int(g.rpartition(".")[2])]
        t = t.float().contiguous()
        if kind == "F32":
            w.add_tensor(g, t.numpy())
        elif kind == "BF16":
            w.add_tensor(g, t.to(torch.bfloat16).view(torch.int16).numpy(), raw_dtype=GGMLQuantizationType.BF16)
        elif kind == "F16":
            w.add_tensor(g, t.to(torch.float16).numpy())
        else:  # the gguf package's quantizer: the converter's own, so the bytes are its bytes
            w.add_tensor(g, quantize(t.numpy(), GGMLQuantizationType[kind]), raw_dtype=GGMLQuantizationType[kind])
    return _write(w, out, progress)[0]


# ---- in ----
def attach_mmproj(model, path: str | Path, dtype: torch.dtype = torch.float32, source: Path | None = None) -> None:
    """Read the mmproj GGUF `path` (load_mmproj) and give `model` its tower as weights.attach_vision does, with
    `model.config.vision_config` set to match (what writes a checkpoint of the model reads it). A model that
    already has a tower is refused: two towers for one model is a mistake, not a choice."""
    from dataclasses import asdict

    from ..weights import attach_vision

    if getattr(model, "visual", None) is not None:
        raise CheckpointError(f"{path}: the model already has a vision tower (from its checkpoint); an mmproj is for "
                              "a text-only model, such as a GGUF")
    tower = load_mmproj(path, model.config, dtype, source)
    vision = asdict(tower.config)
    theta = vision.pop("rope_theta")
    vision.update(model_type="qwen3_5_vision", hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=[],
                  rope_parameters={"rope_type": "default", "rope_theta": theta})
    # ModelConfig is frozen, and vision_config takes no part in its equality or hash: set it in place, so the
    # config object the model and its layers share stays one object
    object.__setattr__(model.config, "vision_config", vision)
    attach_vision(model, tower)


def load_mmproj(path: str | Path, config, dtype: torch.dtype = torch.float32, source: Path | None = None):
    """The vision tower (model/vision.py VisionModel) in the mmproj GGUF `path`, for a text model of ModelConfig
    `config` (its hidden size must be the file's projection_dim): parameters in `dtype`, LayerNorms in fp32 (as
    weights._load_vision), its `processor` from the file's clip metadata. source: where the text model was
    loaded from (its tokenizer gives the placeholder token ids; placeholder_ids). Raises CheckpointError naming
    the file when it is not a Qwen3.5 mmproj or belongs to another model."""
    from dataclasses import replace

    from torch import nn

    from ..checkpoint_index import skip_init
    from ..model.vision import VisionModel
    from ..vision_input import ImageProcessor
    from ..weights import check_finite
    from .reader import open_gguf, to_torch

    f = open_gguf(path)
    vcfg = tower_config(f, config.hidden_size, placeholder_ids(source, config))
    problems = tensor_problems(f, vcfg)
    if problems:
        raise CheckpointError(f"{f.path}: {problems[0]}")
    with torch.device("meta"), skip_init():
        tower = VisionModel(vcfg)
    params = dict(tower.named_parameters())
    for n, p in params.items():
        split = gguf_names(n, p.shape[2] if n == PATCH else 1)
        parts = [to_torch(f.tensors[g], f.path) for g in split]
        t = torch.stack(parts, dim=2) if n == PATCH else parts[0]
        check_finite(f.path, split[0], t)
        keep = torch.float32 if "norm" in n.split(".")[-2] else dtype
        module, _, attr = n.rpartition(".")
        setattr(tower.get_submodule(module), attr, nn.Parameter(t.to(keep), requires_grad=False))
    tower.processor = replace(ImageProcessor.from_model_dir(None, vcfg),
                              image_mean=tuple(float(v) for v in f.get("clip.vision.image_mean")),
                              image_std=tuple(float(v) for v in f.get("clip.vision.image_std")))
    return tower.eval()


def tower_config(f, text_hidden: int | None = None, ids: dict[str, int] | None = None):
    """The VisionConfig of an opened mmproj GGUF (vision_config's checks, then VisionConfig's), with the
    placeholder token `ids` (placeholder_ids; None: VisionConfig's defaults, for a file looked at alone)."""
    from ..model.vision import VisionConfig

    try:  # (a size the tower cannot have, e.g. heads that do not divide the width)
        return VisionConfig.from_hf({**vision_config(f, text_hidden), **(ids or {})}, source=str(f.path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def tensor_problems(f, vcfg) -> list[str]:
    """How the tensors of the opened mmproj `f` differ from those of a tower of VisionConfig `vcfg`: missing
    or unexpected names, shapes, a type the reader cannot dequantize; [] where they are exactly its tensors.
    Reads the tensor index only (and one row of each quantized tensor)."""
    import numpy as np
    from gguf.quants import dequantize

    from ..checkpoint_index import skip_init
    from ..model.vision import VisionModel
    from .reader import FLOAT_TYPES

    with torch.device("meta"), skip_init():
        shapes = {n: tuple(p.shape) for n, p in VisionModel(vcfg).named_parameters()}
    want = {}  # llama.cpp name -> torch-order shape (each frame of the patch kernel on its own)
    for n, shape in shapes.items():
        for g in gguf_names(n, shape[2] if n == PATCH else 1):
            want[g] = shape[:2] + shape[3:] if n == PATCH else shape
    problems = []
    missing = sorted(g for g in want if g not in f.tensors)
    unexpected = [g for g in f.tensors if g not in want]
    for names, what in ((missing, "missing tensor"), (unexpected, "unexpected tensor")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            problems.append(f"{what} '{names[0]}'{more} for a tower of {vcfg.depth} blocks")
    for g, shape in want.items():
        t = f.tensors.get(g)
        if t is None:
            continue
        got = tuple(int(s) for s in reversed(t.shape.tolist()))
        if got != shape:
            problems.append(f"tensor '{g}' has shape {list(reversed(got))} (GGUF order), the metadata implies "
                            f"{list(reversed(shape))}")
        elif t.tensor_type not in FLOAT_TYPES:
            try:
                dequantize(np.ascontiguousarray(t.data.reshape(-1, t.data.shape[-1])[:1]), t.tensor_type)
            except NotImplementedError:
                problems.append(f"tensor '{g}' has type {t.tensor_type.name}, which cannot be dequantized yet")
    return problems


def check_tensors(f, text_hidden: int | None = None) -> list[str]:
    """`qwen35 verify`'s check of an opened mmproj: its metadata (projecting to `text_hidden`, the text model's
    hidden size; None: on its own), then its tensors against the tower the metadata describes (tensor_problems).
    Every problem, each a line."""
    try:
        vcfg = tower_config(f, text_hidden)
    except CheckpointError as e:
        return [f"config: {e}"]
    return tensor_problems(f, vcfg)


def check_mmproj(path: str | Path, config=None) -> None:
    """What load_model checks before the text model loads: `path` is a Qwen3.5 mmproj GGUF, projecting to the
    hidden size of `config` (the text model's ModelConfig; None: not checked)."""
    from .reader import open_gguf

    vision_config(open_gguf(path), config.hidden_size if config is not None else None)


def vision_config(f, text_hidden: int | None) -> dict:
    """The HF `vision_config` (token ids aside) an opened mmproj GGUF describes, checked against the text model's
    hidden size `text_hidden` (None: not checked); a CheckpointError naming the file for anything else."""
    from ..config_fields import is_integer, is_number, short_repr

    arch = f.get("general.architecture")
    if arch != ARCH or f.get("general.type", "mmproj") != "mmproj":
        what = f"GGUF architecture {arch!r}" + (" (a text model)" if arch == "qwen35" else "")
        raise CheckpointError(f"{f.path}: not an mmproj file ({what}; an mmproj has architecture '{ARCH}' and "
                              f"general.type 'mmproj')")
    if not f.get("clip.has_vision_encoder"):
        raise CheckpointError(f"{f.path}: this mmproj has no vision encoder (clip.has_vision_encoder is not true)")
    projector = f.get("clip.projector_type") or f.get("clip.vision.projector_type")
    if projector != PROJECTOR:
        raise CheckpointError(f"{f.path}: mmproj projector type {short_repr(projector)}; qwen35 runs Qwen3.5's "
                              f"'{PROJECTOR}' towers only")

    def integer(key: str) -> int:
        v = f.get(f"clip.vision.{key}")
        if not is_integer(v) or v < 1:
            raise CheckpointError(f"{f.path}: metadata key 'clip.vision.{key}' must be an integer >= 1, got "
                                  f"{short_repr(v)}")
        return int(v)

    projection = integer("projection_dim")
    if text_hidden is not None and projection != text_hidden:
        raise CheckpointError(f"{f.path}: this mmproj projects to {projection} dims (clip.vision.projection_dim) but "
                              f"the text model's hidden size is {text_hidden}: it belongs to another model")
    for key in ("image_mean", "image_std"):
        v = f.get(f"clip.vision.{key}")
        if not isinstance(v, list) or len(v) != 3 or not all(is_number(x) for x in v) or (
                key == "image_std" and min(v) <= 0):
            raise CheckpointError(f"{f.path}: metadata key 'clip.vision.{key}' must be 3 numbers, got {short_repr(v)}")
    deepstack = f.get("clip.vision.is_deepstack_layers") or []
    if any(deepstack):
        raise CheckpointError(f"{f.path}: this mmproj has deepstack layers (Qwen3-VL); Qwen3.5 towers have none")
    pos = f.tensors.get("v.position_embd.weight")
    if pos is None:
        raise CheckpointError(f"{f.path}: missing tensor 'v.position_embd.weight'")
    temporal = 1 + sum(f"v.patch_embd.weight.{t}" in f.tensors for t in range(1, 8))  # one kernel per frame
    return {"depth": integer("block_count"), "hidden_size": integer("embedding_length"),
            "num_heads": integer("attention.head_count"), "intermediate_size": integer("feed_forward_length"),
            "out_hidden_size": projection, "patch_size": integer("patch_size"), "temporal_patch_size": temporal,
            "spatial_merge_size": integer("spatial_merge_size"), "in_channels": 3,
            "num_position_embeddings": int(pos.shape[1]), "hidden_act": "gelu_pytorch_tanh",
            "deepstack_visual_indexes": [], "model_type": "qwen3_5_vision",
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def placeholder_ids(source: Path | None, config) -> dict[str, int]:
    """The image / video placeholder token ids for a tower attached to the text model loaded from `source`:
    its vision_config's where it has one, else found by their text in its tokenizer (a GGUF's
    tokenizer.ggml.tokens, a directory's tokenizer.json), else the official Qwen3.5 ids where the vocabulary
    holds them. An mmproj holds no tokens: the tower and its text model must agree on them."""
    from ..config import VISION_TOKEN_KEYS
    from ..shapes import VISION_TOKENS

    if config.vision_config and all(k in config.vision_config for k in VISION_TOKEN_KEYS):
        return {k: config.vision_config[k] for k in VISION_TOKEN_KEYS}
    vocab = _vocabulary(source) if source is not None else None
    if vocab is not None:
        found = {k: vocab.get(text) for k, text in PLACEHOLDERS.items()}
        missing = [PLACEHOLDERS[k] for k, v in found.items() if v is None]
        if missing:
            raise CheckpointError(f"{source}: its tokenizer has no {missing[0]} token, which image prompts need: the "
                                  "mmproj cannot be used with this text model")
        return found
    if all(v < config.vocab_size for v in VISION_TOKENS.values()):
        return dict(VISION_TOKENS)
    raise CheckpointError(f"{source}: no tokenizer to find the image placeholder tokens in, and the vocabulary of "
                          f"{config.vocab_size} tokens cannot hold Qwen3.5's")


def _vocabulary(source: Path) -> dict[str, int] | None:
    """The placeholder texts -> ids in the tokenizer beside the text model (None where there is none)."""
    from .reader import is_gguf_path, open_gguf

    wanted = set(PLACEHOLDERS.values())
    if is_gguf_path(source) and source.is_file():
        tokens = open_gguf(source).get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            return None
        return {t: i for i, t in enumerate(tokens) if t in wanted}
    f = source / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        added = json.loads(f.read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, ValueError):
        return None
    return {a["content"]: a["id"] for a in added if isinstance(a, dict) and a.get("content") in wanted}
