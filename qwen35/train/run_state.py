"""A training run's saved state: checkpoints written all or nothing, and what a resume must match.

A save is all or nothing: the checkpoint (weights, adapters, trainer state) is written into `out/.saving`,
renamed `out/.saved` once complete, then its files are moved over the old ones. A run killed while writing
leaves the previous step in `out` (the partial folder is dropped); one killed while moving is finished by the
next `load_state` (`recover`), so weights and trainer state always come from the same step. A resume is
refused, before the model loads where the command can tell, when a setting, the data or the adapters differ
from the run it continues (the saved optimizer and schedule would silently make another run). A sharded (FSDP)
run gathers its weights and optimizer state into the layout one process saves (gather_state) and loads that
layout into its shards (load_sharded_optimizer), so a run resumes on any number of processes, sharded or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import vlm_key, write_checkpoint
from ..config import VISION_TOKEN_KEYS, ModelConfig
from ..errors import Qwen35Error
from ..model.qwen35 import Qwen35ForCausalLM
from ..quant.checkpoint import vision_tensors

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
SAVING, SAVED = ".saving", ".saved"  # a checkpoint being written into out / written whole, being moved in
# what a resumed run must share with the one it continues (flag of each): the saved optimizer and scheduler
# would silently keep the old --lr and warmup, and other rows, batches, losses or precision make a different
# run (--steps may grow)
SAME_RUN = {"lr": "--lr", "seq_len": "--seq-len", "batch_size": "--batch-size", "grad_accum": "--grad-accum",
            "warmup": "--warmup", "seed": "--seed", "mtp_weight": "--mtp-weight", "bf16": "--bf16",
            "data": "--data"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# a vision model's preprocessing settings: without them the saved model would size images by the defaults
VISION_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


class TrainError(Qwen35Error):
    """Training cannot go on (diverged, or a state to resume that is missing or does not fit)."""


def config_dict(config: ModelConfig) -> dict:
    """A transformers-compatible `qwen3_5_text` config.json for `config`."""
    c = config
    return {
        "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "linear_num_key_heads": c.linear_num_key_heads, "linear_num_value_heads": c.linear_num_value_heads,
        "linear_key_head_dim": c.linear_key_head_dim, "linear_value_head_dim": c.linear_value_head_dim,
        "linear_conv_kernel_dim": c.linear_conv_kernel_dim, "layer_types": list(c.layer_types),
        "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu", "attention_bias": False,
        "rope_parameters": c.rope_parameters(),
        "mtp_num_hidden_layers": c.mtp_num_hidden_layers,
        "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) > 1 else (c.eos_token_ids or [None])[0],
    }


def has_vision(model) -> bool:
    """The model holds its vision tower (weights.attach_vision): its checkpoints then hold the tower too."""
    return getattr(model, "visual", None) is not None


def checkpoint_config(model) -> dict:
    """config.json for a checkpoint of `model`: with its vision tower the composite `qwen3_5` config that
    official releases ship (transformers loads it as Qwen3_5ForConditionalGeneration, qwen35 with
    model.visual), holding config_dict's text config and the model's vision_config and placeholder ids;
    config_dict's text-only one otherwise (a --config naming a tower that was never built included)."""
    text = config_dict(model.config)
    if not has_vision(model):
        return text
    vision = dict(model.config.vision_config)
    ids = {k: vision.pop(k) for k in VISION_TOKEN_KEYS if k in vision}
    del text["architectures"]
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text,
            "vision_config": vision, **ids, "tie_word_embeddings": model.config.tie_word_embeddings}


def checkpoint_key(model, name: str) -> str:
    """Where parameter `name` is stored: the official VLM key (`model.language_model.*`) beside a vision tower,
    as the composite config's readers (transformers among them) expect; the text layout's otherwise."""
    return vlm_key(name) if has_vision(model) else name


def copy_side_files(model, out: Path, tokenizer_dir: Path | None) -> None:
    """The tokenizer and template files from `tokenizer_dir`, and with a vision tower its preprocessing
    settings (VISION_FILES) from the checkpoint the model was loaded from (a tower built in memory has none:
    it then sizes images by the defaults)."""
    sources = [(Path(tokenizer_dir), TOKENIZER_FILES)] if tokenizer_dir is not None else []
    info = getattr(model, "checkpoint_info", None)
    if has_vision(model) and info is not None:
        sources.append((Path(info.path), VISION_FILES))
    for folder, names in sources:
        for name in names:
            if (folder / name).is_file():
                shutil.copy(folder / name, out / name)


def save(model: Qwen35ForCausalLM, out: Path, tokenizer_dir: Path | None = None,
         full_state: dict[str, torch.Tensor] | None = None, state: dict | None = None) -> Path:
    """Weights (fp32) and config in the official text layout, plus the tokenizer files and `state` (the
    trainer state, as trainer_state.pt). A vision model's is the official composite layout: its tower (frozen:
    it is outside the parameters training sees) as it was loaded, the composite config and the source's
    preprocessor configs (checkpoint_config, copy_side_files). With LoRA active, the adapters are merged into
    the saved weights (the model itself keeps them) and also written alone to lora.safetensors, which resume
    reads. On a quantized base only the adapters are written (train/qlora.py: write_merged makes the merged
    checkpoint, once, at the end). All of it replaces the previous checkpoint in `out` at once, or not at all
    (module docstring); other files in `out` stay."""
    out = Path(out)
    recover(out)
    tmp = out / SAVING
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write(model, tmp, tokenizer_dir, full_state)
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    for f in tmp.iterdir():  # on disk before the commit, so a power cut cannot commit empty files
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, out / SAVED)  # the commit: from here this step is the checkpoint
    recover(out)
    return out


def recover(out: str | Path) -> None:
    """Finish what a killed save left in `out`: move in a checkpoint written whole (`.saved`), drop a partial
    one (`.saving`); nothing to do after a save that completed."""
    out = Path(out)
    done = out / SAVED
    # every process of a torchrun resume comes here at once: what another one moved already is done
    with contextlib.suppress(FileNotFoundError):
        for f in sorted(done.iterdir(), key=lambda f: f.name == STATE_FILE):  # the trainer state last
            with contextlib.suppress(FileNotFoundError):
                os.replace(f, out / f.name)
        done.rmdir()
    shutil.rmtree(out / SAVING, ignore_errors=True)


def _write(model: Qwen35ForCausalLM, out: Path, tokenizer_dir: Path | None,
           full_state: dict[str, torch.Tensor] | None) -> None:
    if getattr(model, "quant", None) is not None:  # a quantized base: the adapters are all that changed
        from .qlora import save_adapters

        save_adapters(model, out, tokenizer_dir)
        return
    # the parameters by name: gathered from the shards (FSDP), or copies of the model's own (fused projections
    # are views of one matrix, which safetensors refuses to write as separate tensors)
    params = full_state if full_state is not None else {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors = {n: t.float().contiguous() for n, t in params.items() if "lora_" not in n}
    if getattr(model, "lora_active", False):
        from safetensors.torch import save_file

        from .lora import LoRALinear

        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                delta = (params[name + ".lora_B"].float() @ params[name + ".lora_A"].float()) * module.lora_scale
                tensors[name + ".weight"] = tensors[name + ".weight"] + delta
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: t.float().contiguous() for n, t in params.items() if "lora_" in n},
                  str(out / "lora.safetensors"))
    tensors = {checkpoint_key(model, n): t for n, t in tensors.items()}
    tensors.update(vision_tensors(model))
    write_checkpoint(tensors, checkpoint_config(model), out)
    copy_side_files(model, out, tokenizer_dir)


def load_state(out: Path) -> dict:
    """The trainer state saved in `out` (a save a kill interrupted finished or dropped first: `recover`), or a
    one-line error saying why it cannot be resumed."""
    recover(out)
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise TrainError(f"{path} not found: nothing to resume (train without --resume)")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in pickle or zipfile, any way
        raise TrainError(f"{path}: not a readable trainer state ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    if not isinstance(state, dict) or not {"step", "losses", "config"} <= state.keys():
        raise TrainError(f"{path}: not a trainer state (no step, losses and config)")
    if "optimizer" not in state:
        raise TrainError(f"{path}: written by a sharded (FSDP) run of an earlier version, which did not save its "
                         "optimizer state: it cannot be resumed")
    return state


def _shown(key: str, value) -> str:
    if key == "bf16":
        return "on" if value else "off"
    if key == "data":
        return ", ".join(f"{name} [{size} bytes, sha256 {digest[:12]}]" for name, size, digest in value)
    return f"{value:g}"


def check_same_run(state: dict, now: dict, path: Path) -> None:
    """Refuse to resume with a setting the saved run did not use, naming its flag, the saved value and the
    new one. Data is the same when its files' sizes and contents are (not their names or places)."""
    saved = state["config"]
    for key, flag in SAME_RUN.items():
        old, new = saved.get(key), now.get(key)
        if old is None or new is None:  # a state from before the setting was saved, or data not given
            continue
        if key == "data":
            if [tuple(f[1:]) for f in old] == [tuple(f[1:]) for f in new]:
                continue
            fix = "resume with the run's own files"
        elif old == new:
            continue
        elif key == "bf16":
            fix = "resume with --bf16" if old else "resume without --bf16"
        else:
            fix = f"resume with {flag} {_shown(key, old)}"
        raise TrainError(f"{flag} {_shown(key, new)} differs from the run in {path} ({_shown(key, old)}): {fix}, "
                         "or train into a new --out")


def check_steps(state: dict, steps: int, path: Path) -> None:
    """--steps counts from the start of the run: it cannot go below the step the run has saved."""
    if steps < state["step"]:
        raise TrainError(f"--steps {steps} is below the step the run in {path} has reached ({state['step']}): "
                         f"resume with --steps {state['step']} or more")


def lora_info(model) -> dict | None:
    """What a LoRA run's adapters mean, saved with its state: their scale (alpha / rank) and the base they adapt
    (its resolved path; None for a model built in memory). None without adapters."""
    from .lora import LoRALinear

    mod = next((m for m in model.modules() if isinstance(m, LoRALinear)), None)
    if mod is None:
        return None
    info = getattr(model, "checkpoint_info", None)
    return {"rank": int(mod.lora_A.shape[0]), "scale": float(mod.lora_scale),
            "base": str(Path(info.path).resolve()) if info is not None else None}


def check_same_lora(saved: dict | None, now: dict | None, path: Path) -> None:
    """Refuse to resume adapters with another scale (--lora-alpha) or on another base (--init-from): either
    gives another model than the one they were trained in."""
    if not saved or not now:
        return
    if saved.get("scale") is not None and now.get("scale") is not None and saved["scale"] != now["scale"]:
        rank = saved.get("rank") or now.get("rank")
        raise TrainError(f"--lora-alpha {now['scale'] * rank:g} (scale {now['scale']:g}) differs from the run in "
                         f"{path} (--lora-alpha {saved['scale'] * rank:g}, scale {saved['scale']:g}): resume with "
                         f"--lora-alpha {saved['scale'] * rank:g}, or train into a new --out")
    if saved.get("base") and now.get("base") and Path(saved["base"]).resolve() != Path(now["base"]).resolve():
        raise TrainError(f"--init-from {now['base']} differs from the base of the run in {path} "
                         f"({saved['base']}): resume with --init-from {saved['base']}, or train into a new --out")


def check_processes(batch_size: int, world: int) -> None:
    """What a run on `world` processes (torchrun) cannot do; the command checks it before loading the model."""
    if batch_size % world:
        raise TrainError(f"--batch-size {batch_size} (global) must be a multiple of the {world} processes")


def _numbered_names(model, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter `opt` holds, in the order opt.state_dict() numbers them (param-group order)."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for g in opt.param_groups for p in g["params"]]


def gather_state(model, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """A sharded (FSDP) run's state to save: the parameters by name and the optimizer state in the layout of a
    single process's `opt.state_dict()` (parameters numbered in param-group order, the same hyperparameters),
    so what a sharded run writes resumes under any number of processes, sharded or not. Gathered from the
    shards: a collective every process takes part in; rank 0 gets the full tensors (fp32, on the CPU), the others
    empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full, optim = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}, {}
    names = _numbered_names(model, opt)
    return full, {"state": {i: optim["state"][n] for i, n in enumerate(names) if n in optim["state"]},
                  "param_groups": opt.state_dict()["param_groups"]}


def load_sharded_optimizer(model, opt: torch.optim.Optimizer, saved: dict) -> None:
    """Load a saved optimizer state (a single process's layout, which gather_state writes too) into the shards
    of a sharded (FSDP) run: each process keeps its rows of every tensor. A collective. Raises ValueError, as
    opt.load_state_dict does, when the saved parameter groups do not fit the parameters trained now."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    sizes = [len(g["params"]) for g in opt.param_groups]
    if [len(g["params"]) for g in saved["param_groups"]] != sizes:
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's "
                         "group")
    names = _numbered_names(model, opt)
    groups, first = [], 0
    for g, size in zip(saved["param_groups"], sizes):
        groups.append({**g, "params": names[first : first + size]})
        first += size
    by_name = {"state": {names[i]: s for i, s in saved["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))
    for g, kept in zip(opt.param_groups, saved["param_groups"]):  # as saved: the tensors' trip made betas a list
        g.update({k: v for k, v in kept.items() if k != "params"})


def cut_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run logged after its last saved step (and a line it left half written): the
    resumed run logs those steps again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)  # a kill now leaves the old file or the new one, never a cut one
