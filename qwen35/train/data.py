"""Training data: documents from text or JSONL files, packed into fixed-length rows.

- plain text file: one document;
- JSONL: one document per line, `{"text": ...}`, or `{"messages": [...], "tools": [...]?}` rendered with the
  chat template,
  where only the assistant turns (their text through `<|im_end|>`) carry loss.
Packing fills each row with whole documents (a longer one is cut into row-sized pieces) and records a
segment id per token: the model keeps documents apart (attention, conv window and recurrent state), and a
token's label is the next token of its own document only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import Qwen35Error

IGNORE = -100
ASSISTANT_OPEN = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"


class DataError(Qwen35Error):
    """A training file is missing or malformed; the message names the file and line."""


@dataclass
class Document:
    ids: list[int]
    loss: list[bool]  # loss[t]: token t is a target (predicted from what precedes it)


def _chat_document(messages, tokenizer, where: str, tools=None) -> Document:
    try:
        text = tokenizer.chat_template.render(messages, tools=tools, add_generation_prompt=False)
    except Qwen35Error as e:
        raise DataError(f"{where}: {e}") from None
    ids, offsets = tokenizer.encode_with_offsets(text)
    spans, pos = [], 0
    while (start := text.find(ASSISTANT_OPEN, pos)) >= 0:
        begin = start + len(ASSISTANT_OPEN)
        end = text.find(TURN_END, begin)
        end = len(text) if end < 0 else end + len(TURN_END)
        spans.append((begin, end))
        pos = end
    loss = [any(b <= s and e <= end for b, end in spans) for s, e in offsets]
    return Document(ids, loss)


def read_documents(paths: list[str | Path], tokenizer) -> list[Document]:
    eos = tokenizer.token_to_id("<|endoftext|>")
    docs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"training data not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix != ".jsonl":
            ids = tokenizer.encode(text) + ([eos] if eos is not None else [])
            docs.append(Document(ids, [True] * len(ids)))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                ids = tokenizer.encode(obj["text"]) + ([eos] if eos is not None else [])
                docs.append(Document(ids, [True] * len(ids)))
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                docs.append(_chat_document(obj["messages"], tokenizer, where, obj.get("tools")))
            else:
                raise DataError(f"{where}: expected an object with 'text' (string) or 'messages' (list)")
    if not docs:
        raise DataError("the training data holds no documents")
    return docs


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
