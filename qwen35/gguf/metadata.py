"""ModelConfig <-> llama.cpp's `qwen35.*` metadata keys (the hyperparameters; the tokenizer is vocab.py).

Reading builds an HF-style `qwen3_5_text` config dict, so ModelConfig.from_hf applies its usual checks; a
GGUF of another architecture is refused by name. Writing emits the keys llama.cpp's converter writes.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import ModelConfig
from ..config_fields import is_integer, is_number, short_repr
from ..errors import CheckpointError

log = logging.getLogger("qwen35")
ARCH = "qwen35"
KNOWN_OTHER = {"qwen35moe": "Qwen3.5 MoE", "qwen3next": "Qwen3-Next", "qwen3": "Qwen3", "qwen2": "Qwen2",
               "llama": "Llama", "clip": "a vision tower: an mmproj file, loaded beside its text model with mmproj="}


def check_architecture(f) -> None:
    arch = f.get("general.architecture")
    if arch != ARCH:
        what = f" ({KNOWN_OTHER[arch]})" if arch in KNOWN_OTHER else ""
        raise CheckpointError(f"{f.path}: GGUF architecture is {arch!r}{what}; qwen35 runs only '{ARCH}' "
                              f"(dense Qwen3.5) models")


def config_dict(f) -> dict[str, Any]:
    """The HF `qwen3_5_text` config a `qwen35` GGUF describes."""
    check_architecture(f)

    def get(key: str, default: Any = ...):
        v = f.get(f"{ARCH}.{key}")
        if v is None:
            if default is ...:
                raise CheckpointError(f"{f.path}: missing metadata key '{ARCH}.{key}'")
            return default
        return v

    def integer(key: str, default: Any = ..., least: int = 1) -> int:
        """A count or size: an integer (an integral float too), at least `least` (most divide something)."""
        v = get(key, default)
        if not is_integer(v) or v < least:
            raise CheckpointError(f"{f.path}: metadata key '{ARCH}.{key}' must be an integer >= {least}, got "
                                  f"{short_repr(v)}")
        return int(v)

    def number(key: str, default: Any = ...) -> float:
        """A positive finite number (an epsilon, a RoPE base, a scaling factor)."""
        v = get(key, default)
        if not is_number(v) or v <= 0:
            raise CheckpointError(f"{f.path}: metadata key '{ARCH}.{key}' must be a positive number, got "
                                  f"{short_repr(v)}")
        return float(v)

    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{f.path}: missing tensor 'token_embd.weight'")
    vocab = int(embd.shape[1])
    mtp = integer("nextn_predict_layers", 0, least=0)
    blocks = integer("block_count")
    if mtp >= blocks:  # the MTP blocks are counted in block_count, after the text layers
        raise CheckpointError(f"{f.path}: metadata key '{ARCH}.nextn_predict_layers' ({mtp}) leaves no text layers "
                              f"of '{ARCH}.block_count' ({blocks})")
    layers = blocks - mtp
    head_dim = integer("attention.key_length")
    value_heads = integer("ssm.time_step_rank")
    inner = integer("ssm.inner_size")
    if inner % value_heads:  # the value head dim is inner_size / time_step_rank
        raise CheckpointError(f"{f.path}: metadata key '{ARCH}.ssm.inner_size' ({inner}) is not a multiple of "
                              f"'{ARCH}.ssm.time_step_rank' ({value_heads})")
    layer_types = _layer_types(f, get("attention.recurrent_layers", None), layers, integer)
    sections = get("rope.dimension_sections", [11, 11, 10, 0])
    if not isinstance(sections, list) or not all(is_integer(s) and s >= 0 for s in sections):
        raise CheckpointError(f"{f.path}: metadata key '{ARCH}.rope.dimension_sections' must be an array of "
                              f"integers >= 0, got {short_repr(sections)}")
    rope = {"rope_type": "default", "rope_theta": number("rope.freq_base", 1e7),
            "partial_rotary_factor": integer("rope.dimension_count", head_dim // 4) / head_dim,
            "mrope_section": [int(s) for s in sections[:3]], "mrope_interleaved": True}
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        if scaling != "yarn":
            raise CheckpointError(f"{f.path}: rope scaling {short_repr(scaling)} is not supported (only yarn)")
        # beta_fast / beta_slow default as in transformers and llama.cpp (32, 1); the attention factor, when
        # absent, is derived from the factor by both
        rope.update(rope_type="yarn", factor=number("rope.scaling.factor"),
                    original_max_position_embeddings=integer("rope.scaling.original_context_length"),
                    beta_fast=number("rope.scaling.yarn_beta_fast", ModelConfig.rope_beta_fast),
                    beta_slow=number("rope.scaling.yarn_beta_slow", ModelConfig.rope_beta_slow))
        if get("rope.scaling.yarn_attn_factor", None) is not None:
            rope["attention_factor"] = number("rope.scaling.yarn_attn_factor")
    cfg = {
        "model_type": "qwen3_5_text",
        "vocab_size": vocab,
        "hidden_size": integer("embedding_length"),
        "intermediate_size": integer("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": integer("attention.head_count"),
        "num_key_value_heads": integer("attention.head_count_kv"),
        "head_dim": head_dim,
        "linear_num_key_heads": integer("ssm.group_count"),
        "linear_num_value_heads": value_heads,
        "linear_key_head_dim": integer("ssm.state_size"),
        "linear_value_head_dim": inner // value_heads,
        "linear_conv_kernel_dim": integer("ssm.conv_kernel"),
        "layer_types": layer_types,
        "rms_norm_eps": number("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": integer("context_length", 262144),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "rope_parameters": rope,
        "mtp_num_hidden_layers": mtp,
        "hidden_act": "silu",
    }
    eos = f.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        if not is_integer(eos):
            raise CheckpointError(f"{f.path}: metadata key 'tokenizer.ggml.eos_token_id' must be an integer, got "
                                  f"{short_repr(eos)}")
        if 0 <= eos < vocab:
            cfg["eos_token_id"] = int(eos)
        else:  # as ModelConfig.from_hf (and llama.cpp) do: an id the model cannot emit stops nothing
            log.warning("%s: metadata key 'tokenizer.ggml.eos_token_id' = %d is not a token id of the %d-token "
                        "vocabulary; ignored", f.path, eos, vocab)
    return cfg


def _layer_types(f, recurrent: Any, layers: int, integer) -> list[str]:
    """From `attention.recurrent_layers` (one flag per block) if present, else `full_attention_interval`."""
    if recurrent is None:
        interval = integer("full_attention_interval", 4)
        return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    if not isinstance(recurrent, list) or len(recurrent) < layers or not all(
            isinstance(r, (bool, int)) for r in recurrent):
        raise CheckpointError(f"{f.path}: metadata key '{ARCH}.attention.recurrent_layers' must be an array of "
                              f"{layers} or more flags, got {short_repr(recurrent)}")
    return ["linear_attention" if r else "full_attention" for r in recurrent[:layers]]


def write_config(w, config: ModelConfig, mtp_layers: int) -> None:
    """The `qwen35.*` hyperparameter keys, onto a gguf.GGUFWriter."""
    c = config
    w.add_block_count(c.num_hidden_layers + mtp_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_sections([*c.mrope_section, *([0] * (4 - len(c.mrope_section)))])
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    if mtp_layers:
        w.add_nextn_predict_layers(mtp_layers)
    w.add_ssm_conv_kernel(c.linear_conv_kernel_dim)
    w.add_ssm_state_size(c.linear_key_head_dim)
    w.add_ssm_group_count(c.linear_num_key_heads)
    w.add_ssm_time_step_rank(c.linear_num_value_heads)
    w.add_ssm_inner_size(c.linear_value_dim)
    # llama.cpp reads the layer pattern from here when present (its converter writes it from layer_types)
    w.add_array(f"{ARCH}.attention.recurrent_layers",
                [t == "linear_attention" for t in c.layer_types] + [False] * mtp_layers)
    w.add_full_attention_interval(_interval(c))
    w.add_rope_dimension_count(c.rotary_dim)
    if c.rope_type == "yarn":
        from gguf import RopeScalingType

        check_exportable(c)
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.rope_factor)
        w.add_rope_scaling_orig_ctx_len(c.rope_original_max_position_embeddings)
        # the keys llama.cpp's converter writes from these rope_parameters when the config sets them (HF values
        # as they are); config_dict reads them back. llama.cpp itself reads them for some architectures only
        if c.rope_beta_fast != ModelConfig.rope_beta_fast:
            w.add_rope_scaling_yarn_beta_fast(c.rope_beta_fast)
        if c.rope_beta_slow != ModelConfig.rope_beta_slow:
            w.add_rope_scaling_yarn_beta_slow(c.rope_beta_slow)
        if c.rope_attention_factor is not None:
            w.add_rope_scaling_yarn_attn_factor(c.rope_attention_factor)
    elif c.rope_type != "default":
        raise CheckpointError(f"cannot export rope_type {c.rope_type!r} to GGUF")


def check_exportable(c: ModelConfig) -> None:
    """Refuse yarn settings GGUF has no key for, rather than write a file that loads as another model."""
    if c.rope_type != "yarn":
        return
    if not c.rope_truncate:  # llama.cpp (and config_dict) always round the ramp's ends to whole dims
        raise CheckpointError("cannot export yarn rope_parameters 'truncate': false to GGUF: GGUF has no key for "
                              "it (llama.cpp always truncates the correction range)")
    # mscale / mscale_all_dim only matter when they set the attention factor (no explicit attention_factor)
    if c.rope_attention_factor is None and c.rope_mscale and c.rope_mscale_all_dim:
        from ..model.rope import rope_inv_freq

        raise CheckpointError(f"cannot export yarn rope_parameters 'mscale' ({c.rope_mscale}) and "
                              f"'mscale_all_dim' ({c.rope_mscale_all_dim}) to GGUF: GGUF has no keys for them; set "
                              f"'attention_factor' to the value they give ({rope_inv_freq(c)[1]!r}) instead")


def _interval(c: ModelConfig) -> int:
    full = c.full_attention_layers
    return full[0] + 1 if full else c.num_hidden_layers
