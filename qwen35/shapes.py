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


def text_config(shape: str, **over) -> dict:
    """The `text_config` dict (model_type qwen3_5_text) of a named shape."""
    if shape not in SHAPES:
        raise KeyError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return {"model_type": "qwen3_5_text", **COMMON, **SHAPES[shape], **over}


def composite_config(shape: str, **over) -> dict:
    """An official-style composite config (model_type qwen3_5) without a vision tower."""
    text = text_config(shape, **over)
    return {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
            "text_config": text, "tie_word_embeddings": text["tie_word_embeddings"]}
