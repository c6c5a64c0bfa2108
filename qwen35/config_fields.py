"""config.json's fields read by type: an integer is an integer (not "256", not 256.7), a flag is true or false
(not "false"), a number is finite; the RoPE block in either layout; eos ids. Each error names the file and
the key. Shared with the GGUF metadata reader and the sampling parameters' checks."""

from __future__ import annotations

import logging
import math
from typing import Any

from .errors import ConfigError

log = logging.getLogger("qwen35")


def rope_fields(text: dict[str, Any], source: str) -> dict[str, Any]:
    """RoPE settings from `rope_parameters` (transformers 5) or legacy `rope_scaling` + top-level keys."""
    rp = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported yet (supported: default, yarn)")
    # model/rope.py runs the interleaved T,H,W layout only; transformers' qwen3_5 ignores this key and always
    # interleaves too, so a chunked layout (qwen2_vl style) has no Qwen3.5 reference to be checked against
    if not bool_field(rp.get("mrope_interleaved", True), source, "mrope_interleaved"):
        raise ConfigError(f"{source}: rope_parameters 'mrope_interleaved': false (chunked mRoPE sections) is not "
                          "supported; Qwen3.5 interleaves the T/H/W rotary frequencies (mrope_interleaved: true)")

    def number(key: str, default: float | None) -> float | None:
        # rope_theta and partial_rotary_factor may also sit at the top level (the legacy layout)
        v = rp.get(key, text.get(key) if key in ("rope_theta", "partial_rotary_factor") else None)
        return default if v is None else float_field(v, source, key)

    out: dict[str, Any] = {
        "rope_theta": number("rope_theta", 10000.0),
        "partial_rotary_factor": number("partial_rotary_factor", 0.25),
        "rope_type": rope_type,
        "mrope_interleaved": True,
    }
    if "mrope_section" in rp:
        sections = rp["mrope_section"]
        if not isinstance(sections, (list, tuple)):
            raise ConfigError(f"{source}: 'mrope_section' must be a list of integers, got {short_repr(sections)}")
        out["mrope_section"] = tuple(int_field(x, source, f"mrope_section[{i}]") for i, x in enumerate(sections))
    if rope_type == "yarn":
        orig = rp.get("original_max_position_embeddings")
        if orig is None:
            raise ConfigError(f"{source}: yarn rope_parameters need 'original_max_position_embeddings'")
        orig = int_field(orig, source, "original_max_position_embeddings")
        if orig < 1:  # the default factor divides by it
            raise ConfigError(f"{source}: yarn original_max_position_embeddings must be >= 1, got {orig}")
        factor = number("factor", None)
        if factor is None:
            max_pos = text.get("max_position_embeddings")
            factor = int_field(262144 if max_pos is None else max_pos, source, "max_position_embeddings") / orig
        if factor <= 0:
            raise ConfigError(f"{source}: yarn 'factor' must be a positive number, got {factor!r}")
        out.update(
            rope_factor=factor,
            rope_original_max_position_embeddings=orig,
            rope_attention_factor=number("attention_factor", None),
            # `or`, as transformers reads them: a 0 means the default too
            rope_beta_fast=float_field(rp.get("beta_fast") or 32, source, "beta_fast"),
            rope_beta_slow=float_field(rp.get("beta_slow") or 1, source, "beta_slow"),
            rope_mscale=number("mscale", None),
            rope_mscale_all_dim=number("mscale_all_dim", None),
            rope_truncate=bool_field(rp.get("truncate", True), source, "truncate"),
        )
    return out


def is_integer(v: Any) -> bool:
    """A JSON (or GGUF) integer: an int, or a float with an integral value (256.0); never a bool, which Python
    counts as an int but no config means as a size."""
    return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))


def is_number(v: Any) -> bool:
    """A finite int or float that float() takes; never a bool."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int past float's range (JSON has no limit on an integer's digits)
        return False


def short_repr(v: Any) -> str:
    """repr(v), cut short: an error message stays one line however large the bad value."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def int_field(v: Any, source: str, key: str) -> int:
    if not is_integer(v):  # int("256") or int(256.7) would quietly accept what the file did not say
        raise ConfigError(f"{source}: '{key}' must be an integer, got {short_repr(v)}")
    return int(v)


def float_field(v: Any, source: str, key: str) -> float:
    if not is_number(v):
        raise ConfigError(f"{source}: '{key}' must be a finite number, got {short_repr(v)}")
    return float(v)


def bool_field(v: Any, source: str, key: str) -> bool:
    if not isinstance(v, bool):  # bool("false") is True: a string would flip the meaning
        raise ConfigError(f"{source}: '{key}' must be true or false, got {short_repr(v)}")
    return v


def read_eos_ids(eos: Any, vocab_size: int, source: str) -> tuple[int, ...]:
    """eos_token_id: absent or null (none), one id, or a list of ids; a non-integer is an error. An id outside
    the vocabulary is dropped with a warning, not refused: the model can never emit it, so it stops nothing, and
    generation stops on the tokenizer's ids, not these; shapes.py's small replicas keep the official 248044 over
    a few thousand tokens."""
    if eos is None:
        return ()
    if isinstance(eos, (list, tuple)):
        ids = [int_field(x, source, f"eos_token_id[{i}]") for i, x in enumerate(eos)]
    else:
        ids = [int_field(eos, source, "eos_token_id")]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        listed = ", ".join(map(str, bad))
        what = f"{listed} is not a token id" if len(bad) == 1 else f"{listed} are not token ids"
        log.warning("%s: eos_token_id %s of the vocabulary (vocab_size %d); ignored", source, what, vocab_size)
    return tuple(i for i in ids if 0 <= i < vocab_size)
