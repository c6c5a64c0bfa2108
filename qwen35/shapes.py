"""Official Qwen3.5 dense shapes (text tower), for replicas, memory planning and benchmarks.

Values from ../shared/reference/qwen35-architecture.md section 1.2 (model cards and public configs).
"""

from __future__ import annotations

COMMON = dict(
    vocab_size=248320, head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=262144, full_attention_interval=4,
    mtp_num_hidden_layers=1, eos_token_id=248044,
    rope_parameters=dict(rope_type="default", rope_theta=10000000, partial_rotary_factor=0.25,
                         mrope_section=[11, 11, 10], mrope_interleaved=True),
)

SHAPES: dict[str, dict] = {
    "0.8b": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=3584, num_attention_heads=8,
                 num_key_value_heads=2, linear_num_value_heads=16, tie_word_embeddings=True),
    "2b": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=6144, num_attention_heads=8,
               num_key_value_heads=2, linear_num_value_heads=16, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, num_hidden_layers=32, intermediate_size=9216, num_attention_heads=16,
               num_key_value_heads=4, linear_num_value_heads=32, tie_word_embeddings=True),
    "9b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=12288, num_attention_heads=16,
               num_key_value_heads=4, linear_num_value_heads=32, tie_word_embeddings=False),
    # A small shape with the real head layout, for quick local runs.
    "tiny": dict(hidden_size=256, num_hidden_layers=8, intermediate_size=512, num_attention_heads=2,
                 num_key_value_heads=1, linear_num_value_heads=2, linear_num_key_heads=2, tie_word_embeddings=True,
                 vocab_size=4096),
}


# The vision tower per size (architecture reference section 1.3; 2B assumed equal to 0.8B, UNVERIFIED there).
VISION_SHAPES: dict[str, dict] = {
    "0.8b": dict(depth=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    "2b": dict(depth=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    "4b": dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096),
    "9b": dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304),
    "tiny": dict(depth=2, hidden_size=128, num_heads=2, intermediate_size=256),
}
VISION_TOKENS = dict(image_token_id=248056, video_token_id=248057, vision_start_token_id=248053,
                     vision_end_token_id=248054)


def vision_config(shape: str, out_hidden_size: int) -> dict:
    """The `vision_config` dict of a named shape (constants common to every size, then its own sizes)."""
    return {"model_type": "qwen3_5_vision", "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16,
            "temporal_patch_size": 2, "spatial_merge_size": 2, "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [], "out_hidden_size": out_hidden_size, **VISION_SHAPES[shape]}


def text_config(shape: str, **over) -> dict:
    """The `text_config` dict (model_type qwen3_5_text) of a named shape."""
    if shape not in SHAPES:
        raise KeyError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    cfg = {"model_type": "qwen3_5_text", **COMMON, **SHAPES[shape], **over}
    if isinstance(cfg.get("eos_token_id"), int) and cfg["eos_token_id"] >= cfg["vocab_size"]:
        del cfg["eos_token_id"]  # a reduced vocabulary without the official end token: the config names none
    return cfg


def composite_config(shape: str, vision: bool = False, **over) -> dict:
    """An official-style composite config (model_type qwen3_5), with the size's vision tower when `vision`."""
    text = text_config(shape, **over)
    cfg = {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
           "text_config": text, "tie_word_embeddings": text["tie_word_embeddings"]}
    if vision:
        cfg.update(vision_config=vision_config(shape, text["hidden_size"]), **VISION_TOKENS)
    return cfg
