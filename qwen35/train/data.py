"""Training data: documents from text or JSONL files, packed into fixed-length rows.

- plain text file: one document;
- JSONL (a .jsonl or .json name, any case): one document per line, `{"text": ...}`, or `{"messages": [...], "tools": [...]?}` rendered with the
  chat template,
  where only the assistant turns (their text through `<|im_end|>`) carry loss.
Packing fills each row with whole documents (a longer one is cut into row-sized pieces) and records a
segment id per token: the model keeps documents apart (attention, conv window and recurrent state), and a
token's label is the next token of its own document only.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import Qwen35Error

IGNORE = -100
ASSISTANT_OPEN = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"
ROLES = ("system", "user", "assistant", "tool")  # the server's (server/messages.py); developer = system
JSONL_SUFFIXES = (".jsonl", ".json")  # a .json file is read as JSON lines: one object per line


class DataError(Qwen35Error):
    """A training file is missing or malformed; the message names the file and line."""


@dataclass
class Document:
    ids: list[int]
    loss: list[bool]  # loss[t]: token t is a target (predicted from what precedes it)


def _known_roles(messages, where: str) -> list:
    """The messages with developer read as system; an unknown role is an error (the template would drop the
    turn, and its tokens with it, without a word)."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "developer":
            m = {**m, "role": "system"}
        if isinstance(m, dict) and "role" in m and m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}]: unknown role {m['role']!r} (use {', '.join(ROLES)} or "
                            "developer)")
        out.append(m)
    return out


def _chat_document(messages, tokenizer, where: str, tools=None) -> Document:
    messages = _known_roles(messages, where)
    try:  # typed control tokens in the messages are text, as at inference (ChatTemplate.render_segments)
        pieces = tokenizer.chat_template.render_segments(messages, tokenizer.added_tokens, tools=tools,
                                                         add_generation_prompt=False)
    except Qwen35Error as e:
        raise DataError(f"{where}: {e}") from None
    ids, offsets = tokenizer.encode_segments_with_offsets(pieces)
    # the assistant turns the template opened and closed: a user's typed "<|im_start|>assistant" opens none
    opens, ends, at = [], [], 0
    for piece, is_template in pieces:
        if is_template:
            opens += [at + m.end() for m in re.finditer(re.escape(ASSISTANT_OPEN), piece)]
            ends += [at + m.end() for m in re.finditer(re.escape(TURN_END), piece)]
        at += len(piece)
    spans, pos = [], 0
    for begin in opens:
        if begin < pos:
            continue
        end = next((e for e in ends if e > begin), at)
        spans.append((begin, end))
        pos = end
    loss = [any(b <= s and e <= end for b, end in spans) for s, e in offsets]
    return Document(ids, loss)


def read_documents(paths: list[str | Path], tokenizer) -> list[Document]:
    """Every file's documents. Data with nothing to train on is an error (training would report a loss of 0 and
    learn nothing): a chat file without an assistant turn (likely the wrong format), or all the files together
    holding no text. An empty text file among others is only empty (a corpus of source files has some)."""
    docs = []
    for path in map(Path, paths):
        found, chat = _file_documents(path, tokenizer)
        if chat and not _has_targets(found):
            raise DataError(f"{path}: no assistant tokens to train on (no conversation has an assistant turn "
                            "with content)")
        docs += found
    if not _has_targets(docs):
        where = str(paths[0]) if len(paths) == 1 else f"the training data ({len(paths)} files)"
        raise DataError(f"{where}: no text to train on")
    return docs


def _has_targets(docs: list[Document]) -> bool:
    return any(any(d.loss[1:]) for d in docs)  # a target is a loss token after the first


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"training data not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None


def _file_documents(path: Path, tokenizer) -> tuple[list[Document], bool]:
    """The documents of one file, and whether any of them is a conversation."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    text = _read_text(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        if not text.strip():  # blanks alone are no text: they would train on whitespace tokens and the eos
            return [], False
        ids = tokenizer.encode(text) + ([eos] if eos is not None else [])
        return [Document(ids, [True] * len(ids))], False
    docs, chat = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); {path.suffix} data holds one JSON object "
                            "per line") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            if not obj["text"].strip():
                continue
            ids = tokenizer.encode(obj["text"]) + ([eos] if eos is not None else [])
            docs.append(Document(ids, [True] * len(ids)))
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            docs.append(_chat_document(obj["messages"], tokenizer, where, obj.get("tools")))
            chat = True
        else:
            raise DataError(f"{where}: expected an object with 'text' (string) or 'messages' (list)")
    return docs, chat


def data_fingerprint(paths: list[str | Path]) -> list[tuple[str, int, str]]:
    """(name, size in bytes, sha256) of each file in order: what a resumed run must train on again (another
    order packs other rows). The contents decide, not the names or modification times."""
    from ..manifest import file_hash

    out = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"training data not found: {path}")
        try:
            digest = file_hash(path, "sha256")
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e.strerror})") from None
        out.append((path.name, path.stat().st_size, digest))
    return out


def check_targets(rows: list[PackedRow], flag: str, seq_len: int) -> None:
    """Packed rows must hold a target (each file has one, but rows of seq_len cut documents apart)."""
    if not any(bool((r.labels != IGNORE).any()) for r in rows):
        raise DataError(f"{flag}: no tokens to train on in rows of --seq-len {seq_len}")


def check_vocab(tokenizer_size: int, model_size: int) -> None:
    """A token id past the model's vocabulary indexes outside its embedding table."""
    if tokenizer_size > model_size:
        raise Qwen35Error(f"the tokenizer has {tokenizer_size} tokens but the model's vocab_size is {model_size}")


@dataclass
class PackedRow:
    ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T], IGNORE where no target
    segments: torch.Tensor  # [T] document ids, -1 for filler


def pack(docs: list[Document], seq_len: int, seed: int = 0, pad_id: int = 0) -> list[PackedRow]:
    """Rows of `seq_len` tokens holding whole documents in a seeded order."""
    pieces = []
    for d in docs:
        for s in range(0, len(d.ids), seq_len):
            if len(d.ids[s:]) >= 2:
                pieces.append(Document(d.ids[s : s + seq_len], d.loss[s : s + seq_len]))
    random.Random(seed).shuffle(pieces)
    rows, cur = [], []
    for p in pieces:
        if sum(len(q.ids) for q in cur) + len(p.ids) > seq_len:
            rows.append(cur)
            cur = []
        cur.append(p)
    if cur:
        rows.append(cur)
    out = []
    for row in rows:
        ids, labels, segs = [], [], []
        for k, p in enumerate(row):
            ids += p.ids
            # target of position t is token t+1 of the same document, when that token carries loss
            labels += [p.ids[t + 1] if p.loss[t + 1] else IGNORE for t in range(len(p.ids) - 1)] + [IGNORE]
            segs += [k] * len(p.ids)
        fill = seq_len - len(ids)
        out.append(PackedRow(torch.tensor(ids + [pad_id] * fill), torch.tensor(labels + [IGNORE] * fill),
                             torch.tensor(segs + [-1] * fill)))
    return out
