"""A chat request's prompt as token ids, tokenized once, and a bound on its length known before that.

The server needs two encodings of a conversation: with the assistant's opening (the prompt) and without it
(the history, whose length is the turn boundary the prompt cache snapshots at). Tokenizing both doubled the
work for every request (~4 s a 7 MB body here). The prompt is almost always the history's text followed by a
control token (`<|im_start|>assistant ...`), and the tokenizer splits its input at control tokens before
anything else (HF tokenizers' added vocabulary), so the prompt's ids are the history's ids followed by the
tail's: `conversation_ids` proves that the split holds and encodes each part once, and falls back to two
whole encodings when it does not.

`least_tokens` is a lower bound on a text's token count, cheap enough to run before rendering: every
whitespace-separated run of characters starts a token of its own (the pre-tokenizer never joins two runs),
and no token is longer than the vocabulary's longest. A body that must overrun the context is refused
without rendering or tokenizing it.
"""

from __future__ import annotations

from collections.abc import Iterable

Pieces = list[tuple[str, bool]]  # ChatTemplate.render_segments: (text, is_template)


SYSTEM_PREFIX_MIN = 256  # an opening system turn this long (tools included) is worth a snapshot of its own


def system_prefix(tokenizer, prompt: str, ids: list[int]) -> int:
    """Where the opening system turn (the system prompt and the tools block) ends in `ids`: the start of the
    next turn, which is a prefix every conversation with that system prompt and those tools shares (an
    agent's thousands of tokens). 0 where the prompt opens with no system turn, or a short one. The second
    `<|im_start|>` id is the template's: a client's typed spelling is encoded as text (render_segments)."""
    start = tokenizer.token_to_id("<|im_start|>")
    if start is None or not prompt.startswith("<|im_start|>system") or not ids or ids[0] != start:
        return 0
    try:
        end = ids.index(start, 1)
    except ValueError:
        return 0
    return end if end >= SYSTEM_PREFIX_MIN else 0


def conversation_ids(tokenizer, prompt: Pieces, history: Pieces) -> tuple[list[int], int]:
    """(the prompt's ids, the history's length in them, or 0 where the history's ids are not a prefix of the
    prompt's)."""
    split = _tail(tokenizer, prompt, history)
    if split is not None:
        hist_ids = tokenizer.encode_segments(history)
        return hist_ids + tokenizer.encode(split), len(hist_ids)
    ids, hist_ids = tokenizer.encode_segments(prompt), tokenizer.encode_segments(history)
    return ids, len(hist_ids) if ids[: len(hist_ids)] == hist_ids else 0


def _tail(tokenizer, prompt: Pieces, history: Pieces) -> str | None:
    """The prompt's text after the history's where the prompt's pieces are the history's with text appended
    to the last (template) piece, that text starts with a control token, and no control token's spelling
    crosses the cut (the tokenizer would match that one instead); else None."""
    if not prompt or not history or len(prompt) != len(history) or prompt[:-1] != history[:-1]:
        return None
    (text, template), (head, head_template) = prompt[-1], history[-1]
    if not (template and head_template and text.startswith(head)):
        return None
    cut, tail = len(head), text[len(head):]
    specials = tokenizer.added_tokens
    if not any(tail.startswith(t) for t in specials if t):
        return None
    for t in specials:  # a spelling that begins before the cut and ends after it (the only ones this window holds)
        if t and text.find(t, max(0, cut - len(t) + 1), cut + len(t) - 1) != -1:
            return None
    return tail


# Python's str.split() also splits at U+001C..U+001F, which are no whitespace (\s) to the tokenizers' regexes:
# there a run such as "!\x1c!" can be one pre-token, so those count as ordinary characters here
_NOT_SPACE = str.maketrans("\x1c\x1d\x1e\x1f", "xxxx")


def least_tokens(texts: Iterable[str], max_token_bytes: int) -> int:
    """A lower bound on the tokens of `texts` (each tokenized on its own or within a longer text)."""
    n = 0
    for t in texts:
        runs = len((t.translate(_NOT_SPACE) if any(c in t for c in "\x1c\x1d\x1e\x1f") else t).split())
        n += max(runs, -(-len(t.encode("utf-8", "surrogatepass")) // max_token_bytes))
    return n


def message_texts(messages: list[dict]) -> Iterable[str]:
    """The text a conversation's messages carry (image parts left out: their URLs are no prompt text)."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    yield part["text"]
        for key in ("reasoning_content", "reasoning", "thinking"):
            if isinstance(m.get(key), str):
                yield m[key]
