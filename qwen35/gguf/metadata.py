"""ModelConfig <-> llama.cpp's `qwen35.*` metadata keys (the hyperparameters; the tokenizer is vocab.py).

Reading builds an HF-style `qwen3_5_text` config dict, so ModelConfig.from_hf applies its usual checks; a
GGUF of another architecture is refused by name. Writing emits the keys llama.cpp's converter writes.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import CheckpointError

ARCH = "qwen35"
KNOWN_OTHER = {"qwen35moe": "Qwen3.5 MoE", "qwen3next": "Qwen3-Next", "qwen3": "Qwen3", "qwen2": "Qwen2",
               "llama": "Llama"}


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

    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{f.path}: missing tensor 'token_embd.weight'")
    mtp = int(get("nextn_predict_layers", 0))
    blocks = int(get("block_count"))
    layers = blocks - mtp
    head_dim = int(get("attention.key_length"))
    value_heads = int(get("ssm.time_step_rank"))
    recurrent = get("attention.recurrent_layers", None)
    if recurrent is not None:
        layer_types = ["linear_attention" if r else "full_attention" for r in list(recurrent)[:layers]]
    else:
        interval = int(get("full_attention_interval", 4))
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    sections = [int(s) for s in get("rope.dimension_sections", [11, 11, 10, 0])][:3]
    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 1e7)),
            "partial_rotary_factor": int(get("rope.dimension_count", head_dim // 4)) / head_dim,
            "mrope_section": sections, "mrope_interleaved": True}
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        if scaling != "yarn":
            raise CheckpointError(f"{f.path}: rope scaling {scaling!r} is not supported (only yarn)")
        rope.update(rope_type="yarn", factor=float(get("rope.scaling.factor")),
                    original_max_position_embeddings=int(get("rope.scaling.original_context_length")))
    eos = f.get("tokenizer.ggml.eos_token_id")
    cfg = {
        "model_type": "qwen3_5_text",
        "vocab_size": int(embd.shape[1]),
        "hidden_size": int(get("embedding_length")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": int(get("attention.head_count")),
        "num_key_value_heads": int(get("attention.head_count_kv")),
        "head_dim": head_dim,
        "linear_num_key_heads": int(get("ssm.group_count")),
        "linear_num_value_heads": value_heads,
        "linear_key_head_dim": int(get("ssm.state_size")),
        "linear_value_head_dim": int(get("ssm.inner_size")) // value_heads,
        "linear_conv_kernel_dim": int(get("ssm.conv_kernel")),
        "layer_types": layer_types,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(get("context_length", 262144)),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "rope_parameters": rope,
        "mtp_num_hidden_layers": mtp,
        "hidden_act": "silu",
    }
    if eos is not None:
        cfg["eos_token_id"] = int(eos)
    return cfg


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

        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.rope_factor)
        w.add_rope_scaling_orig_ctx_len(c.rope_original_max_position_embeddings)
    elif c.rope_type != "default":
        raise CheckpointError(f"cannot export rope_type {c.rope_type!r} to GGUF")


def _interval(c: ModelConfig) -> int:
    full = c.full_attention_layers
    return full[0] + 1 if full else c.num_hidden_layers
