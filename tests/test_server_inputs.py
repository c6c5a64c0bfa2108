"""Hostile or awkward request inputs the server must answer cleanly: long stop strings, decompression-bomb
images, tokens that are part of a UTF-8 character in logprobs, request options at their edges (nulls, logprobs 0,
both max_tokens fields, reserved template variables)."""

import base64
import random
import struct
import time
import warnings
import zlib
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen35.server.stop_strings import StopStrings

# ---- stop strings ----


class ReferenceStopStrings:
    """The original StopStrings (quadratic in a stop's length per token), kept as the reference."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit = False

    def feed(self, text, final=False):
        if not self.stops:
            return text
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.hit = self.buf[:cut], "", True
            return out
        keep = 0 if final else max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])),
                                   default=0)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out


def trace(cls, stops, pieces, finals):
    """Every feed's output, the buffer held back and the hit flag after it."""
    f = cls(stops)
    return [(f.feed(p, final=fin), f.buf, f.hit) for p, fin in zip(pieces, finals)]


def split(text, cuts):
    cuts = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


ALPHABETS = ["ab", "abc", "aab\n", "a\u00e9\u4f60\U0001f600"]  # repeated characters, and non-ASCII text


@st.composite
def stop_case(draw):
    alphabet = draw(st.sampled_from(ALPHABETS))
    chars = st.text(alphabet=alphabet, min_size=0, max_size=7)
    stops = draw(st.lists(chars, min_size=0, max_size=4))
    text = draw(st.text(alphabet=alphabet, max_size=40))
    if stops and draw(st.booleans()):  # plant a stop (often overlapping others) so hits are common
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(stops)) + text[at:]
    pieces = split(text, draw(st.lists(st.integers(0, 60), max_size=12)))
    pieces += draw(st.lists(st.text(alphabet=alphabet, max_size=5), max_size=3))  # feeds after a hit or a final
    finals = [draw(st.integers(0, 5)) == 0 for _ in pieces]
    return stops, pieces, finals


@settings(max_examples=1500, deadline=None)
@given(stop_case())
def test_stop_strings_match_the_reference(case):
    stops, pieces, finals = case
    assert trace(StopStrings, stops, pieces, finals) == trace(ReferenceStopStrings, stops, pieces, finals)


@pytest.mark.parametrize("stops, text", [
    (["aaab"], "aaaaaaab tail"),
    (["aaab", "aab"], "aaaaab"),
    (["abcd", "bc"], "xabcd"),  # the longer stop starts first though the shorter ends first
    (["abab", "babb"], "abababbab"),
    (["\u4f60\u597d", "\U0001f600!"], "ab\u4f60\U0001f600\u4f60\u597d!"),
    (["aa", "a"], "baab"),
    (["abcabd"], "abcabcabd."),
])
def test_stop_strings_examples_char_by_char_and_random_splits(stops, text):
    r = random.Random(0)
    for trial in range(60):
        pieces = list(text) if trial == 0 else split(text, [r.randrange(len(text) + 1) for _ in range(r.randint(0, 6))])
        finals = [False] * (len(pieces) - 1) + [True]
        assert trace(StopStrings, stops, pieces, finals) == trace(ReferenceStopStrings, stops, pieces, finals)


def test_long_stop_strings_cost_time_in_the_text_not_the_stop():
    # the audit's case: four stop strings of 500k characters, text that keeps matching their long common prefix
    stops = ["x" * 500_000 + str(i) for i in range(4)]
    f = StopStrings(stops)
    t0 = time.perf_counter()
    out = [f.feed("xx") for _ in range(2000)]
    assert time.perf_counter() - t0 < 2.0  # quadratic: minutes
    assert out == [""] * 2000 and f.buf == "x" * 4000 and not f.hit
    assert f.feed("y") == "x" * 4000 + "y" and f.buf == ""
    f.feed("x" * 499_999)
    assert f.feed("x2 tail") == "" and f.hit  # the stop found whole, its 500k-character prefix held until then


# ---- images past Pillow's decompression-bomb limit ----


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (1-bit gray) and holds no pixel data: Pillow reads the size from it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


SERVER_CAP = 16_777_216  # the server's default --max-image-pixels


def pillow_max():
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def test_bomb_header_is_refused_like_an_over_cap_image(tmp_path):
    from qwen35.vision_input import ImageError, open_image

    before = pillow_max()
    # 5000x5000 is refused by the server's cap; 20000x20000 by Pillow itself, first: the same error and words
    for w, h in ((5000, 5000), (20000, 20000), (200_000, 1000)):
        png = png_header(w, h)
        path = tmp_path / f"{w}x{h}.png"
        path.write_bytes(png)
        for source in (png, "data:image/png;base64," + base64.b64encode(png).decode(), path):
            with pytest.raises(ImageError, match=rf"^image of {w}x{h} = {w * h} pixels is over the limit of "
                                                 rf"{SERVER_CAP} pixels$"):
                open_image(source, max_pixels=SERVER_CAP)
    # without a cap of our own (library and CLI use) Pillow's limit applies, named as such
    with pytest.raises(ImageError, match=rf"^image of 20000x20000 = 400000000 pixels is over the limit of "
                                         rf"{2 * before} pixels \(Pillow's decompression-bomb limit\)$"):
        open_image(png_header(20000, 20000))
    assert pillow_max() == before  # lifted only to read the refused header, and put back


def test_bomb_warning_as_error_is_refused_too():
    """Between 1x and 2x Pillow's limit it only warns; where warnings are errors that warning is an exception."""
    from PIL import Image

    from qwen35.vision_input import ImageError, open_image

    before = pillow_max()
    png = png_header(10_000, 10_000)  # 100M pixels: over MAX_IMAGE_PIXELS (89.5M), under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match=rf"over the limit of {SERVER_CAP} pixels$"):
            open_image(png, max_pixels=SERVER_CAP)
        with pytest.raises(ImageError, match=rf"over the limit of {before} pixels \(Pillow's"):
            open_image(png)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match=rf"over the limit of {SERVER_CAP} pixels$"):
            open_image(png, max_pixels=SERVER_CAP)
    assert pillow_max() == before


def test_server_answers_a_bomb_with_a_400_naming_the_part():
    from qwen35.server.errors import APIError
    from qwen35.server.images import load_images

    url = "data:image/png;base64," + base64.b64encode(png_header(20000, 20000)).decode()
    vision_model = SimpleNamespace(visual=object())
    with pytest.raises(APIError) as e:
        load_images([("messages[0].content[1]", url)], vision_model, False, SERVER_CAP, 1 << 20)
    assert e.value.status == 400 and e.value.param == "messages[0].content[1]"
    assert "image of 20000x20000 = 400000000 pixels is over the limit of 16777216 pixels" in e.value.message


# ---- logprobs: a token's own bytes ----


@pytest.fixture(scope="module")
def qwen_tok():
    import tokenizer_fixture

    from qwen35.tokenizer import Tokenizer

    return Tokenizer(tokenizer_fixture.build())


@pytest.mark.parametrize("text", ["龘", "𠀀", "a鑿b", "你好"])
def test_logprob_bytes_are_the_tokens_own_bytes(qwen_tok, text):
    from qwen35.server.responses import logprob_entry

    ids = qwen_tok.encode(text)
    alt = qwen_tok.encode("驫")[0]  # itself the first part of a character, as a top alternative
    entries = [logprob_entry(qwen_tok, SimpleNamespace(token=t, logprob=-0.25, top_logprobs=[(t, -0.25), (alt, -2.0)]))
               for t in ids]
    assert b"".join(bytes(e["bytes"]) for e in entries) == text.encode("utf-8")  # they join into the text
    for t, e in zip(ids, entries):
        assert list(e) == ["token", "logprob", "bytes", "top_logprobs"]  # OpenAI's shape
        assert e == {"token": qwen_tok.decode([t]), "logprob": -0.25, "bytes": list(qwen_tok.token_bytes(t)),
                     "top_logprobs": e["top_logprobs"]}
        assert e["top_logprobs"] == [{"token": e["token"], "logprob": -0.25, "bytes": e["bytes"]},
                                     {"token": "\ufffd", "logprob": -2.0, "bytes": [0xE9, 0xA9]}]
    partial = [e for e in entries if e["token"] == "\ufffd"]  # the parts of a character: text U+FFFD, bytes not
    assert bool(partial) == (text != "你好")
    assert all(e["bytes"] != list("\ufffd".encode()) for e in partial)


def test_logprob_entry_without_alternatives(qwen_tok):
    from qwen35.server.responses import logprob_entry

    end = qwen_tok.token_to_id("<|im_end|>")
    e = logprob_entry(qwen_tok, SimpleNamespace(token=end, logprob=0.0, top_logprobs=None))
    assert e == {"token": "<|im_end|>", "logprob": 0.0, "bytes": list(b"<|im_end|>"), "top_logprobs": []}



def options(chat=True, **body):
    """protocol.parse_options on a request body (messages or prompt not read there)."""
    from qwen35.server.protocol import parse_options

    return parse_options({"messages" if chat else "prompt": [], **body}, [0], None, chat=chat)


def refused(param, chat=True, **body):
    from qwen35.server.errors import APIError

    with pytest.raises(APIError) as e:
        options(chat, **body)
    assert e.value.status == 400 and e.value.param == param, body


def test_an_explicit_null_is_the_field_absent():
    """null asks for nothing, as OpenAI reads it: `"logprobs": null` on chat, and `suffix`, `functions`, ...
    set to null, had been refused with 400 (the key was checked, not its value)."""
    from qwen35.server.protocol import NOT_SUPPORTED

    assert options(logprobs=None).params == options().params
    for key in NOT_SUPPORTED:
        assert options(**{key: None}).params == options().params
        assert options(chat=False, **{key: None}).params == options(chat=False).params
    refused("suffix", chat=False, suffix="x")


def test_completions_logprobs_0_still_asks_for_the_chosen_tokens():
    """Completions `logprobs: 0`: the chosen tokens' logprobs without alternatives (0 == False had turned
    them off, `logprobs: null` in the answer)."""
    zero = options(chat=False, logprobs=0).params
    assert zero.logprobs is True and zero.top_logprobs == 0
    assert options(chat=False, logprobs=None).params.logprobs is False


def test_max_tokens_is_checked_beside_max_completion_tokens():
    """An invalid max_tokens is refused even where max_completion_tokens (which wins) is also given: the `or`
    chain had never read it, so `"max_tokens": "lots"` got a 200."""
    assert options(max_completion_tokens=7, max_tokens=9).params.max_tokens == 7
    assert options(max_completion_tokens=None, max_tokens=9).params.max_tokens == 9
    for bad in ("lots", 0, 2.5):
        refused("max_tokens", max_completion_tokens=7, max_tokens=bad)


def test_template_variables_named_as_render_arguments_are_refused():
    """chat_template_kwargs may not name an argument of the template's render (`self` had reached it: a
    TypeError, a 500 with a traceback)."""
    from qwen35.chat_template import RENDER_ARGUMENTS

    for name in sorted(RENDER_ARGUMENTS - {"enable_thinking"}):
        refused("chat_template_kwargs", chat_template_kwargs={name: 1})
    assert options(chat_template_kwargs={"preserve_thinking": True}).template_kwargs == {"preserve_thinking": True}
