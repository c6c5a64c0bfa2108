import json

import pytest

import replica
from qwen35 import ConfigError, ModelConfig


def composite(text=None, **top):
    cfg = {"model_type": "qwen3_5", "text_config": text or {**replica.text_config(), "model_type": "qwen3_5_text"},
           "vision_config": {"depth": 1}, "tie_word_embeddings": False}
    cfg.update(top)
    return cfg


def test_composite_and_text_configs():
    c = ModelConfig.from_hf(composite(tie_word_embeddings=True))
    assert c.model_type == "qwen3_5" and c.tie_word_embeddings and c.vision_config == {"depth": 1}
    assert c.layer_types == ("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3 + (
        "full_attention",)
    assert c.full_attention_layers == (3, 7)
    assert (c.linear_key_dim, c.linear_value_dim, c.linear_conv_dim) == (32, 96, 160)
    assert c.rotary_dim == 16 and c.rope_theta == 1e7 and c.mrope_section == (3, 3, 2)
    t = ModelConfig.from_hf({**replica.text_config(), "model_type": "qwen3_5_text"})
    assert t.model_type == "qwen3_5_text" and not t.tie_word_embeddings and t.vision_config is None


def test_full_attention_interval_and_official_shape():
    cfg = {"model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 1024, "intermediate_size": 3584,
           "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
           "linear_num_key_heads": 16, "linear_num_value_heads": 16, "full_attention_interval": 4,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                               "mrope_section": [11, 11, 10], "mrope_interleaved": True},
           "tie_word_embeddings": True, "mtp_num_hidden_layers": 1, "eos_token_id": 248044}
    c = ModelConfig.from_hf(cfg)
    assert c.full_attention_layers == (3, 7, 11, 15, 19, 23)
    assert c.linear_conv_dim == 6144 and c.rotary_dim == 64 and c.mtp_num_hidden_layers == 1
    assert c.eos_token_ids == (248044,)


def test_yarn_fields():
    rope = {"rope_type": "yarn", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "factor": 4.0,
            "original_max_position_embeddings": 262144, "mrope_section": [11, 11, 10]}
    c = ModelConfig.from_hf({**replica.text_config(), "model_type": "qwen3_5_text", "rope_parameters": rope,
                             "head_dim": 256})
    assert c.rope_type == "yarn" and c.rope_factor == 4.0 and c.rope_original_max_position_embeddings == 262144


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5, "mrope_section": [2, 3, 3]},
    {"rope_type": "yarn", "rope_theta": 1e7, "partial_rotary_factor": 0.5, "factor": 4.0,
     "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2, "mscale": 0.7,
     "mscale_all_dim": 0.5, "truncate": False, "mrope_interleaved": True},
    {"rope_type": "yarn", "original_max_position_embeddings": 65536, "attention_factor": 1.5},  # no factor
    {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192},  # legacy rope_scaling spelling
])
def test_rope_parameters_read_back_to_the_same_config(rope):
    """What a saved checkpoint writes (ModelConfig.rope_parameters) reads back to the same config."""
    text = {**replica.text_config(), "model_type": "qwen3_5_text", "rope_theta": 5e5}  # (legacy: top level)
    del text["rope_parameters"]
    text["rope_scaling" if "type" in rope else "rope_parameters"] = rope
    c = ModelConfig.from_hf(text)
    assert c.rope_type == rope.get("rope_type", rope.get("type"))
    again = {**text, "rope_parameters": c.rope_parameters()}
    again.pop("rope_scaling", None)
    assert ModelConfig.from_hf(again) == c


@pytest.mark.parametrize("model_type,words", [
    ("qwen3_5_moe", "'qwen3_5_moe' (Qwen3.5 MoE) is not supported yet"),
    ("qwen3_next", "'qwen3_next' (Qwen3-Next) is not supported yet"),
    ("llama", "'llama' is not supported yet"),
])
def test_unsupported_model_types(model_type, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_hf({**replica.text_config(), "model_type": model_type})


def test_bad_configs_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="no 'model_type' field"):
        ModelConfig.from_file(tmp_path)
    text = {**replica.text_config(), "model_type": "qwen3_5_text"}
    del text["hidden_size"]
    with pytest.raises(ConfigError, match="missing required field 'hidden_size'"):
        ModelConfig.from_hf(text)
    with pytest.raises(ConfigError, match="needs a 'text_config' object"):
        ModelConfig.from_hf({"model_type": "qwen3_5"})
    with pytest.raises(ConfigError, match=r"layer_types has 2 entries but num_hidden_layers is 8"):
        ModelConfig.from_hf({**text, "hidden_size": 64, "layer_types": ["full_attention"] * 2})
    with pytest.raises(ConfigError, match="rope_type 'longrope' is not supported yet"):
        ModelConfig.from_hf({**text, "hidden_size": 64, "rope_parameters": {"rope_type": "longrope"}})
    with pytest.raises(ConfigError, match="'mrope_interleaved': false .* is not supported"):
        chunked = {**replica.text_config()["rope_parameters"], "mrope_interleaved": False}
        ModelConfig.from_hf({**text, "hidden_size": 64, "rope_parameters": chunked})
    with pytest.raises(ConfigError, match=r"linear_num_value_heads \(3\) must be a multiple of"):
        ModelConfig.from_hf({**text, "hidden_size": 64, "linear_num_value_heads": 3})


def test_unknown_keys_are_ignored():
    """Keys qwen35 does not know (a newer transformers, another tool) change nothing, at any level."""
    base = composite()
    text = {**base["text_config"], "use_cache": True, "some_future_field": [1, 2],
            "rope_parameters": {**base["text_config"]["rope_parameters"], "some_future_rope_key": 2}}
    newer = composite(text=text, transformers_version="9.0", another_top_level_key={"x": 1})
    assert ModelConfig.from_hf(newer) == ModelConfig.from_hf(base)
