"""The tokenizer and chat template in GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), both ways.

Writing follows llama.cpp's rules for byte-level BPE ("gpt2" model, pre-tokenizer "qwen35"): one token string
per embedding row, ids with no token become `[PAD{i}]` (UNUSED), added tokens are CONTROL when special or
when they look like `<|...|>`, else USER_DEFINED; merges, special ids, add_*_token flags and the chat template
come from the checkpoint's tokenizer files through the gguf package's SpecialVocab.

Reading rebuilds an HF `tokenizers` BPE tokenizer from the same fields, with Qwen3.5's normalizer (NFC),
split regex and byte-level stages, so `qwen35.load("model.gguf")` needs no other file. CONTROL tokens come
back as special added tokens, USER_DEFINED ones as non-special.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# llama.cpp's pre-tokenizer names -> the split regex of that family
PRE_TOKENIZERS = {
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _looks_control(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def write_tokenizer(w, model_dir: Path, vocab_size: int) -> None:
    """tokenizer.* keys for the checkpoint in `model_dir` (tokenizer.json beside the weights)."""
    from gguf import SpecialVocab
    from tokenizers import Tokenizer as HFTokenizer

    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer.json to put in the GGUF")
    tok = HFTokenizer.from_file(str(file))
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        t = tok.id_to_token(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(CONTROL if added[i].special or _looks_control(t) else USER_DEFINED)
        else:
            tokens.append(t)
            types.append(NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen35")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    post = json.loads(file.read_text(encoding="utf-8")).get("post_processor") or {}
    if any(p.get("type") == "ByteLevel" for p in post.get("processors", [post])):
        # a byte-level post-processor adds nothing: llama.cpp's newer SpecialVocab says so explicitly
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(w, quiet=True)


def copy_tokenizer(w, f) -> None:
    """tokenizer.* keys copied from another GGUF (re-export of a GGUF)."""
    for key, v in f.fields.items():
        if not key.startswith("tokenizer.") or v is None:
            continue
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            w.add_array(key, list(v))
        elif key == "tokenizer.ggml.token_type":
            w.add_token_types(list(v))
        elif isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v)
        elif isinstance(v, str):
            w.add_string(key, v)


def build_tokenizer(f):
    """(tokenizers.Tokenizer, tokenizer_config-like dict) from a GGUF's tokenizer.* fields."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = f.get("tokenizer.ggml.model")
    if kind is None:  # e.g. exported without a tokenizer source: nothing here to build one from
        raise CheckpointError(f"{f.path}: the GGUF holds no tokenizer metadata (no tokenizer.ggml.model); export "
                              f"it again from a checkpoint directory with a tokenizer.json")
    if kind != "gpt2":
        raise CheckpointError(f"{f.path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    pre = f.get("tokenizer.ggml.pre", "qwen35")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{f.path}: tokenizer.ggml.pre {pre!r} is not known (known: {', '.join(PRE_TOKENIZERS)})")
    tokens = f.get("tokenizer.ggml.tokens")
    types = f.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens or [])
    merges = f.get("tokenizer.ggml.merges") or []
    if not tokens:
        raise CheckpointError(f"{f.path}: no tokenizer.ggml.tokens in the GGUF")
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, k in enumerate(types) if k == CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, k in enumerate(types) if k == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    config = {}
    for key, name in (("eos", "eos_token"), ("padding", "pad_token"), ("bos", "bos_token")):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            config[name] = tokens[int(i)]
    return tok, config


def chat_template(f) -> str | None:
    t = f.get("tokenizer.chat_template")
    return t if isinstance(t, str) and t.strip() else None
