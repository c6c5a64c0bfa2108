"""ModelConfig: the frozen description of a Qwen3.5 text model, read from a checkpoint's config.json.

The architecture is decided by `model_type`, never by a folder or file name. Every field that changes the
math is here; unknown keys are ignored, and anything we cannot run is rejected with a message naming it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_fields import (
    bool_field,
    float_field,
    int_field,
    read_eos_ids,
    rope_fields,
    short_repr,
)
from .errors import ConfigError

# the placeholder token ids a composite (vision) config keeps at its top level; the tower reads them from its
# vision_config, where from_hf merges them (train/run_state.checkpoint_config writes them back out)
VISION_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
# Known relatives we recognise but cannot run yet; named so the error can say so precisely.
KNOWN_UNSUPPORTED = {
    "qwen3_5_moe": "Qwen3.5 MoE",
    "qwen3_5_moe_text": "Qwen3.5 MoE",
    "qwen3_next": "Qwen3-Next",
}
LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    # RoPE (full-attention layers only; Gated DeltaNet has no positional encoding)
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    rope_type: str = "default"  # "default" or "yarn"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int | None = None
    rope_attention_factor: float | None = None
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_truncate: bool = True
    mrope_section: tuple[int, ...] = (11, 11, 10)
    mrope_interleaved: bool = True
    mtp_num_hidden_layers: int = 0
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "qwen3_5_text"
    # The vision tower's settings (model/vision.py VisionConfig.from_hf), with the top-level image/video token ids.
    vision_config: dict[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)

    # ---- derived sizes (computed, never stored in config.json) ----
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def full_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    @property
    def linear_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "linear_attention")

    # ---- construction ----
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a HF config dict (composite `qwen3_5` or text-only `qwen3_5_text`)."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        _check_model_type(model_type, source)
        vision = None
        if model_type == "qwen3_5":
            text = cfg.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type 'qwen3_5' needs a 'text_config' object")
            _check_model_type(text.get("model_type", "qwen3_5_text"), f"{source} text_config")
            vision = cfg.get("vision_config")
            if isinstance(vision, dict):  # the placeholder token ids live at the top level; the tower needs them
                vision = {**vision, **{k: cfg[k] for k in VISION_TOKEN_KEYS if cfg.get(k) is not None}}
            # HF's composite model ties by the top-level flag; fall back to the text config's.
            tie = cfg.get("tie_word_embeddings")
            if tie is None:
                tie = text.get("tie_word_embeddings")
        else:
            text = cfg
            tie = text.get("tie_word_embeddings")

        def get(key: str, default: Any = _REQUIRED) -> Any:
            if key in text and text[key] is not None:
                return text[key]
            if default is _REQUIRED:
                raise ConfigError(f"{source}: missing required field '{key}'")
            return default

        def get_int(key: str, default: Any = _REQUIRED) -> int:
            return int_field(get(key, default), source, key)

        num_layers = get_int("num_hidden_layers")
        hidden = get_int("hidden_size")
        num_heads = get_int("num_attention_heads")
        if num_layers < 1:  # checked here: the layer pattern below is built from it
            raise ConfigError(f"{source}: num_hidden_layers must be positive, got {num_layers}")
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = get_int("full_attention_interval", 4)
            if interval < 1:
                raise ConfigError(f"{source}: full_attention_interval must be >= 1, got {interval}")
            layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)
            ]
        if not isinstance(layer_types, (list, tuple)):  # a bare string would be read as a list of letters
            raise ConfigError(f"{source}: layer_types must be a list, got {short_repr(layer_types)}")
        layer_types = tuple(layer_types)
        if len(layer_types) != num_layers:
            raise ConfigError(
                f"{source}: layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}"
            )
        for i, t in enumerate(layer_types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"{source}: layer_types[{i}] = {t!r} is not one of {LAYER_TYPES}")

        act = text.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Qwen3.5 uses 'silu')")
        if bool_field(get("attention_bias", False), source, "attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported (Qwen3.5 has no biases)")

        rope = rope_fields(text, source)
        vocab = get_int("vocab_size")
        eos_ids = read_eos_ids(text.get("eos_token_id", cfg.get("eos_token_id")), vocab, source)

        config = cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get_int("intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=get_int("num_key_value_heads", num_heads),
            # the default divides: a zero head count is left for validate() to name
            head_dim=get_int("head_dim", hidden // num_heads if num_heads > 0 else 0),
            linear_num_key_heads=get_int("linear_num_key_heads", 16),
            linear_num_value_heads=get_int("linear_num_value_heads", 32),
            linear_key_head_dim=get_int("linear_key_head_dim", 128),
            linear_value_head_dim=get_int("linear_value_head_dim", 128),
            linear_conv_kernel_dim=get_int("linear_conv_kernel_dim", 4),
            layer_types=layer_types,
            rms_norm_eps=float_field(get("rms_norm_eps", 1e-6), source, "rms_norm_eps"),
            max_position_embeddings=get_int("max_position_embeddings", 262144),
            tie_word_embeddings=bool_field(False if tie is None else tie, source, "tie_word_embeddings"),
            mtp_num_hidden_layers=get_int("mtp_num_hidden_layers", 0),
            eos_token_ids=eos_ids,
            model_type=model_type,
            vision_config=vision if isinstance(vision, dict) else None,
            **rope,
        )
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (or a directory holding it)."""
        path = Path(path)
        if path.is_dir():
            from .checkpoint_index import check_not_adapters

            check_not_adapters(path)  # a LoRA output folder: name what to load, not only "config.json not found"
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"config.json not found: {path}")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(cfg, source=str(path))

    def validate(self, source: str = "config") -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"{source}: {what}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
                     "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_conv_kernel_dim"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.linear_num_value_heads % self.linear_num_key_heads == 0,
             f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
             f"linear_num_key_heads ({self.linear_num_key_heads})")
        need(0 < self.partial_rotary_factor <= 1, f"partial_rotary_factor must be in (0, 1], got "
             f"{self.partial_rotary_factor}")
        need(self.rotary_dim % 2 == 0, f"rotary dim head_dim*partial_rotary_factor = {self.rotary_dim} must be even")
        need(self.rotary_dim >= 2, f"rotary dim head_dim*partial_rotary_factor = {self.rotary_dim} must be at "
             f"least 2 (one frequency pair)")
        need(self.mtp_num_hidden_layers >= 0, "mtp_num_hidden_layers must be >= 0")
        # eps sits under a square root (a zero or negative one gives NaN); NaN compares False, so it fails too
        need(self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps),
             f"rms_norm_eps must be a positive number, got {self.rms_norm_eps}")
        # the RoPE wavelengths are powers of theta: at theta <= 1 they no longer grow with the dim (and yarn
        # divides by log(theta))
        need(self.rope_theta > 1 and math.isfinite(self.rope_theta),
             f"rope_theta must be a number greater than 1, got {self.rope_theta}")
        need(self.max_position_embeddings >= 1,
             f"max_position_embeddings must be >= 1, got {self.max_position_embeddings}")
        need(all(s >= 0 for s in self.mrope_section), f"mrope_section entries must be >= 0, got "
             f"{list(self.mrope_section)}")
        for i in self.eos_token_ids:  # generation stops on these ids: one the model cannot emit never stops it
            need(0 <= i < self.vocab_size, f"eos_token_id {i} is not a token id of the vocabulary (vocab_size "
                 f"{self.vocab_size})")
        if self.rope_type == "yarn":
            self._validate_yarn(need)

    def _validate_yarn(self, need) -> None:
        orig = self.rope_original_max_position_embeddings
        need(orig is not None and orig >= 1, f"yarn original_max_position_embeddings must be >= 1, got {orig}")
        need(self.rope_factor > 0 and math.isfinite(self.rope_factor),
             f"yarn 'factor' must be a positive number, got {self.rope_factor}")
        # the ramp takes log(original / (2 pi beta)): a beta <= 0 has no logarithm
        for name in ("rope_beta_fast", "rope_beta_slow"):
            need(getattr(self, name) > 0, f"yarn '{name[5:]}' must be positive, got {getattr(self, name)}")
        need(self.rope_attention_factor is None or self.rope_attention_factor > 0,
             f"yarn 'attention_factor' must be positive, got {self.rope_attention_factor}")

    def rope_parameters(self) -> dict[str, Any]:
        """The HF `rope_parameters` object for config.json: every RoPE setting as read, so that writing a
        checkpoint and reading it back gives this config again (yarn stays yarn)."""
        rp: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                              "partial_rotary_factor": self.partial_rotary_factor,
                              "mrope_section": list(self.mrope_section),
                              "mrope_interleaved": self.mrope_interleaved}
        if self.rope_type == "yarn":
            rp.update(factor=self.rope_factor,
                      original_max_position_embeddings=self.rope_original_max_position_embeddings,
                      beta_fast=self.rope_beta_fast, beta_slow=self.rope_beta_slow,
                      truncate=self.rope_truncate)
            optional = {"attention_factor": self.rope_attention_factor, "mscale": self.rope_mscale,
                        "mscale_all_dim": self.rope_mscale_all_dim}
            # left out when unset: absent means "use the formula's default", as from_hf reads it
            rp.update({k: v for k, v in optional.items() if v is not None})
        return rp

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (for `qwen35 info` and logs)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "vision_config"}
        out["layer_types"] = list(self.layer_types)
        out["mrope_section"] = list(self.mrope_section)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["has_vision"] = self.vision_config is not None
        return out


class _Required:
    pass


_REQUIRED = _Required()


def _check_model_type(model_type: Any, source: str) -> None:
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    if model_type in KNOWN_UNSUPPORTED:
        raise ConfigError(
            f"{source}: model_type {model_type!r} ({KNOWN_UNSUPPORTED[model_type]}) is not supported yet; "
            f"qwen35 runs the dense Qwen3.5 models ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if model_type is None:
        raise ConfigError(f"{source}: no 'model_type' field; cannot tell which architecture this is")
    raise ConfigError(
        f"{source}: model_type {model_type!r} is not supported yet; qwen35 runs "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )
