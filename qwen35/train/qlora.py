"""Fine-tuning on a quantized base (QLoRA): the base stays frozen in its packed form, adapters train beside it.

A model from `load_model(..., quant=...)` (or a `qwen35 quantize` checkpoint) holds its matrices as
QuantizedWeight objects, not parameters. They compute the input gradient from the packed bytes
(quant/weight.py QuantizedMatmul), so LoRA (train/lora.py) trains on them unchanged: apply_lora takes fused
groups apart by running each projection on its own row slice of the packed group (views: no copy, nothing
dequantized). What this module adds:
- `check_trainable`: the combinations that cannot work, as one-line errors (full fine-tuning: the packed bytes
  have no gradient; FSDP: it shards parameters, and these matrices are not parameters);
- `save_adapters` / `load_adapters`: the adapters alone (lora.safetensors) and adapter_config.json (rank,
  alpha, targets, the base and its quantization), which resume checks against the base it is given;
- `merge_quantized` + `write_merged`: adapters folded in matrix by matrix (dequantize one matrix, add
  scale * B A, then keep it as a plain matrix or re-quantize it), written as a bf16 checkpoint or a
  quantized one in the `--quant` scheme vocabulary; `export_gguf` takes the merged model as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import Qwen35Error

ADAPTERS = "lora.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MERGE_BF16 = "bf16"


class QLoRAError(Qwen35Error, ValueError):
    """A quantized-base training request that cannot run; the message names the fix."""


def is_quantized(model) -> bool:
    return getattr(model, "quant", None) is not None


def check_trainable(model, lora: bool, fsdp: bool = False) -> None:
    """Raise QLoRAError for what a quantized base cannot train with."""
    if not is_quantized(model):
        return
    if not lora:
        raise QLoRAError(f"the base is quantized ({model.quant}): its matrices are frozen packed bytes, so it "
                         "trains through adapters only (add --lora-rank R); full fine-tuning needs the "
                         "unquantized checkpoint")
    if fsdp:
        raise QLoRAError("--fsdp shards parameters, and a quantized base's matrices are packed bytes, not "
                         "parameters: train it without --fsdp (each process holds the quantized base)")


def _lora_modules(model):
    from .lora import LoRALinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def save_adapters(model, out: Path, tokenizer_dir: Path | None = None) -> Path:
    """The adapters (fp32) and what they were trained on; no base weights (they are the base's, unchanged)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().float().contiguous() for n, p in model.named_parameters() if "lora_" in n},
              str(out / ADAPTERS))
    from .run_state import lora_info

    meta = {**lora_info(model), "quant": model.quant, "modules": [n for n, _ in _lora_modules(model)]}
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer_dir is not None:
        import shutil

        from .run_state import TOKENIZER_FILES

        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, out / name)
    return out


def load_adapters(model, out: Path) -> None:
    """Read lora.safetensors from `out` into the adapters `apply_lora` made; they must match its modules and
    rank, and adapter_config.json's quantization, scale and base must be this model's (resuming with another
    --quant, --lora-alpha or --init-from is an error)."""
    from safetensors.torch import load_file

    from .run_state import check_same_lora, lora_info

    out = Path(out)
    if not (out / ADAPTERS).is_file():
        raise QLoRAError(f"{out / ADAPTERS} not found: nothing to resume")
    meta_path = out / ADAPTER_CONFIG
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("quant") != getattr(model, "quant", None):
            raise QLoRAError(f"{out} holds adapters trained on a {meta.get('quant') or 'unquantized'} base, but this "
                             f"base is {getattr(model, 'quant', None) or 'unquantized'}: resume with the same --quant")
        check_same_lora(meta, lora_info(model), out)
    adapters = load_file(str(out / ADAPTERS))
    own = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if set(adapters) != set(own) or any(adapters[n].shape != own[n].shape for n in own):
        raise QLoRAError(f"{out / ADAPTERS} does not match this --lora-targets/--lora-rank")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(adapters[n])


def merged_matrix(module) -> torch.Tensor:
    """W + scale * B A in fp32 for one adapted projection (its base dequantized, one matrix at a time)."""
    from ..quant.weight import QuantizedWeight

    w = module.weight
    base = w.dequantize(torch.float32) if isinstance(w, QuantizedWeight) else w.detach().float()
    return base + (module.lora_B.detach().float() @ module.lora_A.detach().float()) * module.lora_scale


def merge_quantized(model, quant: str | None = None):
    """Fold every adapter into its quantized base, in place, and drop the adapters.

    quant None: each adapted projection becomes a plain matrix in the model's dtype; the other matrices stay
    quantized. quant a policy (quant/policy.py): every matrix ends up in the layout that policy gives it:
    adapted ones re-quantized from W + scale B A, the others kept as they are where their layout already is
    the policy's (no second rounding) and re-quantized otherwise. A re-quantization into the same layout
    writes over the old packed bytes (fused groups then read the merged bytes, as merge_lora does for plain
    weights); anything else gets its own storage and its group runs per projection."""
    from ..quant import formats, policy
    from ..quant.weight import QuantizedWeight
    from .lora import Linear

    if quant is not None and quant not in policy.POLICIES:
        raise QLoRAError(f"unknown merge quantization {quant!r}: use bf16 or one of {', '.join(policy.POLICIES)}")
    names = dict(_lora_modules(model))
    shapes = {n: tuple(w.shape) for n, w in model.named_weights()}
    depth = policy.num_layers_of(shapes)
    tied = model.config.tie_word_embeddings
    replaced = set()
    with torch.no_grad():
        for name, w in list(model.named_weights()):
            mod_name = name.rpartition(".")[0]
            module = model.get_submodule(mod_name)
            adapted = mod_name in names and name.endswith(".weight")
            if not adapted and not (quant is not None and isinstance(w, QuantizedWeight)):
                continue
            scheme = policy.scheme_for(quant, name, shapes[name], tied, depth) if quant is not None else None
            if not adapted and scheme == w.scheme:
                continue
            dense = merged_matrix(module) if adapted else w.dequantize(torch.float32)
            if scheme is not None and isinstance(w, QuantizedWeight) and w.scheme == scheme:
                qs, d = formats.quantize_fast(scheme, dense)
                w.qs.copy_(qs)
                w.d.copy_(d)
            else:
                dtype = w.dtype
                module.__dict__.pop("weight", None)
                module._parameters.pop("weight", None)
                if scheme is None:
                    module.weight = nn.Parameter(dense.to(dtype), requires_grad=False)
                else:
                    qs, d = formats.quantize_fast(scheme, dense)
                    new = QuantizedWeight(scheme, qs, d, dense.shape[1])
                    new.dtype = dtype
                    module.weight = new
                replaced.add(id(module))
            if adapted:
                del module.lora_A, module.lora_B
                module.__class__ = Linear
        for owner, attr, fused in getattr(model, "lora_unfused", ()):
            linears = next(ls for o, a, ls in model.fusion_groups() if o is owner and a == attr)
            if not any(id(lin) in replaced for lin in linears):
                setattr(owner, attr, fused)
        if quant is not None:  # groups whose members all changed layout: fuse nothing, run per projection
            for owner, attr, linears in model.fusion_groups():
                if any(id(lin) in replaced for lin in linears):
                    setattr(owner, attr, None)
            model.quant = quant
    model.lora_unfused = []
    model.lora_active = False
    model._rebind()
    return model


def write_merged(model, out: Path, quant: str = MERGE_BF16, tokenizer_dir: Path | None = None) -> Path:
    """Merge the adapters (merge_quantized) and write the merged model to `out`: a bf16 checkpoint
    (quant "bf16": every matrix dequantized, streamed matrix by matrix into the file, in the official layout)
    or a quantized one in the `qwen35 quantize` layout (quant a policy), which load_model reads back without
    requantizing. A vision model's tower (never trained: it is outside the adapted model) goes along
    unquantized, with the composite config and the preprocessor configs, as `qwen35 quantize` keeps it."""
    from ..checkpoint import _write_shards, write_checkpoint
    from ..model.qwen35 import keeps_fp32
    from ..quant.checkpoint import stored_tensors, vision_tensors
    from ..quant.weight import QuantizedWeight
    from .run_state import checkpoint_config, checkpoint_key, copy_side_files

    merge_quantized(model, None if quant == MERGE_BF16 else quant)
    config = checkpoint_config(model)
    out = Path(out)
    if quant == MERGE_BF16:
        tower = vision_tensors(model)  # in their own precision: they are not merged
        weights = {checkpoint_key(model, n): w for n, w in model.named_weights()} | tower

        def dtype_of(key):
            return tower[key].dtype if key in tower else torch.float32 if keeps_fp32(key) else torch.bfloat16

        def tensor_of(key, shape, dtype):  # one dequantized matrix in memory at a time
            w = weights[key]
            return (w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w.detach().to(dtype)).contiguous()

        specs = [(k, tuple(weights[k].shape), dtype_of(k)) for k in sorted(weights)]
        _write_shards(specs, tensor_of, config, out, 2 * 2**30)
    else:
        tensors = stored_tensors(model.named_weights(), quant, config) | vision_tensors(model)
        write_checkpoint(tensors, config, out, 2 * 2**30)
    copy_side_files(model, out, tokenizer_dir)
    return out
