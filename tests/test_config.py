import json
import re
from dataclasses import replace

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


def _text(**over):
    return {**replica.text_config(), "model_type": "qwen3_5_text", **over}


def _rope(**over):
    return {**replica.text_config()["rope_parameters"], **over}


@pytest.mark.parametrize("over,words", [
    ({"hidden_size": "abc"}, "'hidden_size' must be an integer, got 'abc'"),
    ({"hidden_size": [256]}, "'hidden_size' must be an integer, got [256]"),
    ({"hidden_size": 256.7}, "'hidden_size' must be an integer, got 256.7"),  # int() would truncate it
    ({"hidden_size": "64"}, "'hidden_size' must be an integer, got '64'"),
    ({"hidden_size": True}, "'hidden_size' must be an integer, got True"),
    ({"num_attention_heads": "4"}, "'num_attention_heads' must be an integer, got '4'"),
    ({"full_attention_interval": "4", "layer_types": None}, "'full_attention_interval' must be an integer"),
    ({"rms_norm_eps": "x"}, "'rms_norm_eps' must be a finite number, got 'x'"),
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a finite number, got nan"),
    ({"rms_norm_eps": True}, "'rms_norm_eps' must be a finite number, got True"),
    ({"rope_parameters": _rope(rope_theta="1e7")}, "'rope_theta' must be a finite number, got '1e7'"),
    ({"rope_parameters": _rope(rope_theta=float("inf"))}, "'rope_theta' must be a finite number, got inf"),
    ({"rope_parameters": _rope(rope_theta=10**400)}, "'rope_theta' must be a finite number, got 1000"),  # JSON ints
    # have no limit; float() and math.isfinite overflow on this one
    ({"rope_parameters": _rope(partial_rotary_factor=[0.5])}, "'partial_rotary_factor' must be a finite number"),
    ({"rope_parameters": _rope(mrope_section="abc")}, "'mrope_section' must be a list of integers, got 'abc'"),
    ({"rope_parameters": _rope(mrope_section=[3, "3", 2])}, "'mrope_section[1]' must be an integer, got '3'"),
    ({"rope_parameters": _rope(mrope_interleaved="true")}, "'mrope_interleaved' must be true or false, got 'true'"),
    ({"rope_parameters": _rope(rope_type="yarn", factor="4", original_max_position_embeddings=1024)},
     "'factor' must be a finite number, got '4'"),
    ({"rope_parameters": _rope(rope_type="yarn", factor=4.0, original_max_position_embeddings="1024")},
     "'original_max_position_embeddings' must be an integer, got '1024'"),
    ({"rope_parameters": _rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024,
                               beta_fast="x")}, "'beta_fast' must be a finite number, got 'x'"),
    ({"attention_bias": "false"}, "'attention_bias' must be true or false, got 'false'"),
    ({"layer_types": "linear_attention"}, "layer_types must be a list, got 'linear_attention'"),
    ({"eos_token_id": "foo"}, "'eos_token_id' must be an integer, got 'foo'"),
    ({"eos_token_id": [1, "2"]}, "'eos_token_id[1]' must be an integer, got '2'"),
    ({"hidden_size": "x" * 500}, "'hidden_size' must be an integer, got 'xxx"),  # a long value is cut short
])
def test_wrong_typed_fields_are_named(tmp_path, over, words):
    """A field of the wrong JSON type is a ConfigError naming config.json, the field and the value (not a
    ValueError or TypeError from int() / float(), nor a value quietly converted)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in _text(**over).items() if v is not None}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {words}")) as e:
        ModelConfig.from_file(tmp_path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 250


def test_integral_floats_are_integers():
    """256.0 is the integer 256 (some tools write every number as a float)."""
    floats = _text(hidden_size=64.0, vocab_size=320.0, eos_token_id=[1.0],
                   rope_parameters=_rope(mrope_section=[3.0, 3, 2.0]))
    c = ModelConfig.from_hf(floats)
    assert c == ModelConfig.from_hf(_text()) and type(c.hidden_size) is int and c.eos_token_ids == (1,)


@pytest.mark.parametrize("composite_config", [False, True])
def test_tie_word_embeddings_must_be_a_boolean(composite_config):
    """bool("false") is True: a string would tie the head and silently drop a real lm_head."""
    def cfg(tie):
        return composite(tie_word_embeddings=tie) if composite_config else _text(tie_word_embeddings=tie)

    assert ModelConfig.from_hf(cfg(False)).tie_word_embeddings is False
    assert ModelConfig.from_hf(cfg(True)).tie_word_embeddings is True
    for bad in ("false", "true", 0, 1, []):
        with pytest.raises(ConfigError, match=re.escape(f"'tie_word_embeddings' must be true or false, got {bad!r}")):
            ModelConfig.from_hf(cfg(bad))
    # absent or null: the text config's flag, then untied
    text = _text(tie_word_embeddings=True)
    assert ModelConfig.from_hf(composite(text=text, tie_word_embeddings=None)).tie_word_embeddings is True
    del text["tie_word_embeddings"]
    assert ModelConfig.from_hf(text).tie_word_embeddings is False


@pytest.mark.parametrize("over,words", [
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a positive number, got -1.0"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number, got 0.0"),
    ({"rope_parameters": _rope(rope_theta=0)}, "rope_theta must be a number greater than 1, got 0.0"),
    ({"rope_parameters": _rope(rope_theta=-5)}, "rope_theta must be a number greater than 1, got -5.0"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be >= 1, got 0"),
    ({"max_position_embeddings": -5}, "max_position_embeddings must be >= 1, got -5"),
    ({"num_hidden_layers": 0, "layer_types": None}, "num_hidden_layers must be positive, got 0"),
    ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads must be positive, got 0"),  # no // 0
    ({"num_key_value_heads": -2}, "num_key_value_heads must be positive, got -2"),
    ({"head_dim": 0}, "head_dim must be positive, got 0"),
    ({"intermediate_size": 0}, "intermediate_size must be positive, got 0"),
    ({"linear_num_key_heads": 0}, "linear_num_key_heads must be positive, got 0"),
    ({"linear_value_head_dim": -24}, "linear_value_head_dim must be positive, got -24"),
    ({"linear_conv_kernel_dim": 0}, "linear_conv_kernel_dim must be positive, got 0"),
    ({"vocab_size": 0}, "vocab_size must be positive, got 0"),
    ({"mtp_num_hidden_layers": -1}, "mtp_num_hidden_layers must be >= 0"),
    ({"rope_parameters": _rope(partial_rotary_factor=0)}, "partial_rotary_factor must be in (0, 1], got 0.0"),
    ({"rope_parameters": _rope(partial_rotary_factor=1.5)}, "partial_rotary_factor must be in (0, 1], got 1.5"),
    ({"head_dim": 2, "rope_parameters": _rope(partial_rotary_factor=0.25)},
     "rotary dim head_dim*partial_rotary_factor = 0 must be at least 2"),
    ({"rope_parameters": _rope(mrope_section=[3, -1, 2])}, "mrope_section entries must be >= 0, got [3, -1, 2]"),
    ({"rope_parameters": _rope(rope_type="yarn", original_max_position_embeddings=0)},
     "yarn original_max_position_embeddings must be >= 1, got 0"),
    ({"rope_parameters": _rope(rope_type="yarn", factor=-2, original_max_position_embeddings=1024)},
     "yarn 'factor' must be a positive number, got -2.0"),
    ({"rope_parameters": _rope(rope_type="yarn", factor=4, original_max_position_embeddings=1024, beta_slow=-1)},
     "yarn 'beta_slow' must be positive, got -1.0"),
    ({"rope_parameters": _rope(rope_type="yarn", factor=4, original_max_position_embeddings=1024,
                               attention_factor=0)}, "yarn 'attention_factor' must be positive, got 0.0"),
])
def test_out_of_range_values_are_named(tmp_path, over, words):
    """Values that would divide by zero, take the root or log of a negative, or give silent nonsense (token 0
    for every input, a context of -5 tokens) are refused when config.json is read."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in _text(**over).items() if v is not None}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {words}")):
        ModelConfig.from_file(tmp_path)


def test_eos_token_ids(caplog):
    """One id, a list, null or absent read as before; the composite's top-level id is the fallback. An id
    outside the vocabulary (the model can never emit it) is dropped with a warning naming file and id."""
    assert ModelConfig.from_hf(_text(eos_token_id=5)).eos_token_ids == (5,)
    assert ModelConfig.from_hf(_text(eos_token_id=[5, 0, 319])).eos_token_ids == (5, 0, 319)
    assert ModelConfig.from_hf(_text(eos_token_id=None)).eos_token_ids == ()
    text = _text()
    del text["eos_token_id"]
    assert ModelConfig.from_hf(text).eos_token_ids == ()
    assert ModelConfig.from_hf(composite(text=text, eos_token_id=7)).eos_token_ids == (7,)
    with caplog.at_level("WARNING", logger="qwen35"):
        c = ModelConfig.from_hf(_text(eos_token_id=[5, 99999, -1]), source="cfg.json")
    assert c.eos_token_ids == (5,)
    assert "cfg.json: eos_token_id 99999, -1 are not token ids of the vocabulary (vocab_size 320)" in caplog.text
    with pytest.raises(ConfigError, match=r"eos_token_id 320 is not a token id of the vocabulary"):
        replace(c, eos_token_ids=(320,)).validate()
