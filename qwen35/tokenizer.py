"""Tokenizer: the HF `tokenizers` library on a checkpoint's tokenizer.json, with Qwen3.5's rules.

No BOS is ever added; control tokens (`<|im_start|>`, `<think>`, `<tool_call>`, ...) are single ids, except
in `encode_plain`, for text a client wrote, where they are spelled out as ordinary text; normalisation (NFC) and pre-tokenisation come from tokenizer.json itself. `StreamingDetokenizer` turns
ids into text incrementally and never emits broken UTF-8: each token is mapped to its raw bytes and fed
to an incremental UTF-8 decoder, so half of a multi-byte character waits for its other half.
"""

from __future__ import annotations

import codecs
import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .errors import Qwen35Error


class TokenizerError(Qwen35Error):
    """tokenizer.json is missing or unreadable."""


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    def __init__(self, path: str | Path):
        """path: a checkpoint directory, its tokenizer.json, or a GGUF file (its tokenizer.* metadata)."""
        from .gguf.reader import is_gguf_path
        path = Path(path)
        if is_gguf_path(path) and path.is_file():
            from .gguf.reader import open_gguf

            self._from_gguf(open_gguf(path))
            return
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"tokenizer.json not found: {file}")
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise TokenizerError(f"{file}: cannot read tokenizer ({e})") from None
        self.dir = file.parent
        self.config: dict = {}
        cfg = self.dir / "tokenizer_config.json"
        if cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg}: not valid JSON ({e})") from None
        self._index_added()

    @classmethod
    def from_gguf(cls, gguf_file) -> Tokenizer:
        """From an opened GGUF (qwen35.gguf.open_gguf): vocab, merges and special tokens of its metadata."""
        self = cls.__new__(cls)
        self._from_gguf(gguf_file)
        return self

    def _from_gguf(self, f) -> None:
        from .gguf.vocab import build_tokenizer

        self._tok, self.config = build_tokenizer(f)
        self.dir = f.path.parent
        self._index_added()

    def _index_added(self) -> None:
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.added_ids = set(added)
        self.added_tokens = [t.content for t in added.values()]
        self._plain: HFTokenizer | None = None
        self._bytes: dict[int, bytes] = {}  # token_bytes' memo

    # ---- basic API ----
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; control tokens written in the text become their single ids. No BOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` as ordinary text: a control token's spelling becomes the tokens of its
        characters, never its id (the same tokenizer without its added tokens, built on first use)."""
        if self._plain is None:
            spec = json.loads(self._tok.to_str())  # tokenizer.json, or what a GGUF's metadata built
            spec["added_tokens"] = []
            self._plain = HFTokenizer.from_str(json.dumps(spec))
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_segments(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """[(text, is_template)] (ChatTemplate.render_segments) -> ids: template text with its control
        tokens, the rest as plain text."""
        return [i for text, special in pieces for i in (self.encode(text) if special else self.encode_plain(text))]

    def encode_segments_with_offsets(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode_segments` with the character span of each token in the pieces' joined text."""
        self.encode_plain("")  # (builds the plain tokenizer)
        ids, offsets, at = [], [], 0
        for text, special in pieces:
            enc = (self._tok if special else self._plain).encode(text, add_special_tokens=False)
            ids += enc.ids
            offsets += [(at + a, at + b) for a, b in enc.offsets]
            at += len(text)
        return ids, offsets

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and the character span each comes from."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def hf_json(self) -> str:
        """tokenizer.json as text (what the grammar engine builds its own tokenizer from)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def _special_token(self, key: str) -> str | None:
        v = self.config.get(key)
        return v.get("content") if isinstance(v, dict) else v

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end an assistant turn: tokenizer_config's eos plus <|im_end|> and <|endoftext|>."""
        out = []
        for tok in (self._special_token("eos_token"), "<|im_end|>", "<|endoftext|>"):
            i = self.token_to_id(tok) if tok else None
            if i is not None and i not in out:
                out.append(i)
        return out

    # ---- bytes, for streaming ----
    def token_bytes(self, i: int) -> bytes:
        """Raw bytes of one token (added tokens: their text in UTF-8), worked out on its first use and kept (the
        whole table at once had cost 0.75 s of the first generated token on 2 cores: 248K tokens)."""
        if not 0 <= i < self.vocab_size:
            return b""
        out = self._bytes.get(i)
        if out is None:
            tok = self._tok.id_to_token(i)
            if tok is None:
                out = b""
            elif i in self.added_ids:
                out = tok.encode("utf-8")
            else:
                try:
                    dec = _byte_decoder()
                    out = bytes(dec[c] for c in tok)
                except KeyError:  # not byte-level: fall back to the library's own decoding
                    out = self._tok.decode([i]).encode("utf-8")
            self._bytes[i] = out
        return out

    def longest_token_bytes(self) -> int:
        """At least the UTF-8 length of the longest token's text (what a token can cover of a prompt). Read
        from the vocabulary's spellings: a byte-level spelling spends 1 or 2 UTF-8 bytes on each byte it
        stands for, so this never undercounts. ~0.1 s for 248K tokens."""
        return max(len(t.encode("utf-8")) for t in self._tok.get_vocab(with_added_tokens=True))

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens)

    def text_stream(self) -> TextStream:
        return TextStream(self)


class StreamingDetokenizer:
    """Feed token ids one at a time; `add` returns the text that became complete (maybe empty)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def add(self, token_id: int) -> str:
        if self.skip and token_id in self.tokenizer.special_ids:
            return ""
        piece = self._dec.decode(self.tokenizer.token_bytes(token_id))
        self.text += piece
        return piece

    def finalize(self) -> str:
        """Flush bytes still waiting for the rest of a character (they become U+FFFD)."""
        piece = self._dec.decode(b"", final=True)
        self.text += piece
        return piece


class TextStream:
    """Generated tokens -> text deltas, with the one rule for the token that stopped generation: a control
    token (<|im_end|>, <|endoftext|>) ends the turn and shows no text; any other stop token shows its text.
    At the end of generation (finish_reason set) the bytes still waiting for a character are flushed."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.detok = tokenizer.detokenizer()

    def add(self, token: int | None, finish_reason: str | None = None) -> str:
        silent = token is None or (finish_reason == "stop" and token in self.tokenizer.added_ids)
        text = "" if silent else self.detok.add(token)
        return text + self.detok.finalize() if finish_reason is not None else text

    @property
    def text(self) -> str:
        return self.detok.text
