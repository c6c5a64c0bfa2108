"""image_url content parts through the real server (in process, a tiny vision-language replica with the real
tokenizer): the official openai client gets the library's tokens, a follow-up about the same picture reuses
its prefix, and bad images are 400s naming the part, after which the next request is still exact."""

import base64
import io
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_server import free_port, wait_healthy

import qwen35
from qwen35.sampling import SamplingParams

CAP = 6000  # --max-image-pixels of the test server: the pictures below are under it, BIG is over


def picture(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def data_url(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def ask(url, question="What is in this picture?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def serve(model, tok, **kw):
    import uvicorn

    from qwen35.server.app import create_app
    from qwen35.server.engine import Engine

    eng = Engine(model, max_batch=2, max_queue=8, prefill_chunk_size=kw.pop("chunk", 512))
    app = create_app(eng, tok, "model", default_thinking=False, **kw)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    return base, srv, th, eng


@pytest.fixture(scope="module")
def vision_server(vision_chat_model):
    _, path = vision_chat_model
    model, tok = qwen35.load(path, dtype=torch.float32)
    base, srv, th, eng = serve(model, tok, max_image_pixels=CAP)
    yield base, model, tok
    srv.should_exit = True
    th.join(timeout=10)
    eng.shutdown()


def library(model, tok, messages, images, n):
    """The library's answer, rendered as the server renders (past think blocks preserved)."""
    prompt = tok.chat_template.render(messages, add_generation_prompt=True, enable_thinking=False,
                                      preserve_thinking=True)
    params = SamplingParams(temperature=0.0, max_tokens=n)
    return "".join(r.text for r in qwen35.stream_generate(model, tok, prompt, params, images=images))


def test_openai_client_image_url_equals_the_library(vision_server):
    from openai import OpenAI

    base, model, tok = vision_server
    img = picture(40, 72, 1)
    client = OpenAI(base_url=base + "/v1", api_key="unused")
    r = client.chat.completions.create(model="model", messages=ask(data_url(img)), max_tokens=8, temperature=0)
    assert r.choices[0].message.content == library(model, tok, ask("x"), [img], 8).strip()
    grid = model.visual.processor.resized_size(40, 72)
    assert r.usage.prompt_tokens > grid[0] * grid[1] // 64  # the image's pads count as prompt tokens


def test_same_picture_again_reuses_the_prefix(vision_server):
    """A second question about the same picture (re-encoded as BMP: the same pixels) restores the
    snapshot of the first turn; a different picture of the same size does not."""
    base, model, tok = vision_server
    img = picture(48, 48, 2)
    first = ask(data_url(img), "Describe it.")
    with httpx.Client(timeout=120) as h:
        r1 = h.post(base + "/v1/chat/completions", json={"messages": first, "max_tokens": 4, "temperature": 0})
        answer = r1.json()["choices"][0]["message"]["content"]
        follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the colours?"}]
        follow[0] = ask(data_url(img, "BMP"), "Describe it.")[0]
        r2 = h.post(base + "/v1/chat/completions", json={"messages": follow, "max_tokens": 4, "temperature": 0})
        other = [ask(data_url(picture(48, 48, 3)), "Describe it.")[0], *follow[1:]]
        r3 = h.post(base + "/v1/chat/completions", json={"messages": other, "max_tokens": 4, "temperature": 0})
    u1, u2, u3 = (r.json()["usage"] for r in (r1, r2, r3))
    image_tokens = 48 * 48 // 64
    assert u2["prompt_tokens_details"]["cached_tokens"] > image_tokens
    assert u3["prompt_tokens_details"]["cached_tokens"] < image_tokens  # at most the text before the image
    assert u1["prompt_tokens"] > image_tokens
    cold = library(model, tok, [{**follow[0], "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
                                *follow[1:]], [img], 4)
    assert r2.json()["choices"][0]["message"]["content"] == cold.strip()


BIG = picture(100, 100, 4)  # 10,000 pixels > CAP
BAD_IMAGES = [
    ("data:image/png;base64,@@@@", "malformed base64"),
    ("data:image/png;base64," + base64.b64encode(b"just some text, no picture").decode(), "not an image"),
    ("data:image/png," + "abc", "must be base64"),
    (data_url(BIG), "over the limit of 6000 pixels"),
    ("https://example.com/cat.png", "--allow-remote-images"),
    ("file:///etc/passwd", "must hold a data:image"),
]


@pytest.mark.parametrize("url,why", BAD_IMAGES, ids=[w for _, w in BAD_IMAGES])
def test_bad_images_are_400s_and_the_next_request_is_exact(vision_server, url, why):
    base, model, tok = vision_server
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look:"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
    with httpx.Client(timeout=120) as h:
        r = h.post(base + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages[0].content[1]" and why in err["message"], err
        img = picture(40, 40, 5)
        ok = h.post(base + "/v1/chat/completions", json={"messages": ask(data_url(img)), "max_tokens": 5,
                                                          "temperature": 0})
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["content"] == library(model, tok, ask("x"), [img], 5).strip()


def test_text_only_checkpoint_refuses_images(chat_model_dir):
    model, tok = qwen35.load(chat_model_dir, dtype=torch.float32)
    base, srv, th, eng = serve(model, tok)
    try:
        r = httpx.post(base + "/v1/chat/completions", json={"messages": ask(data_url(picture(8, 8, 0))),
                                                            "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and "no vision tower" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages[0].content[0]"
        ok = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 3, "temperature": 0}, timeout=60)
        assert ok.status_code == 200
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        eng.shutdown()


def test_image_prompt_fed_in_chunks_beside_another_request(vision_chat_model):
    """Prefill chunks of 16 tokens (an image's pads split across chunks, interleaved with another prompt's
    chunks and decode steps): both answers equal the library's."""
    from concurrent.futures import ThreadPoolExecutor

    _, path = vision_chat_model
    model, tok = qwen35.load(path, dtype=torch.float32)
    base, srv, th, eng = serve(model, tok, chunk=16)
    img = picture(64, 56, 9)
    text = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea. " * 3}]
    try:
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(httpx.post, base + "/v1/chat/completions", timeout=300,
                                json={"messages": m, "max_tokens": 5, "temperature": 0}) for m in (ask(data_url(img)), text)]
            r_img, r_text = (f.result() for f in futs)
        assert r_img.status_code == r_text.status_code == 200
        assert r_img.json()["choices"][0]["message"]["content"] == library(model, tok, ask("x"), [img], 5).strip()
        prompt = tok.chat_template.render(text, add_generation_prompt=True, enable_thinking=False)
        ref = qwen35.generate(model, tok, prompt, SamplingParams(temperature=0, max_tokens=5))
        assert r_text.json()["choices"][0]["message"]["content"] == ref.strip()
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        eng.shutdown()


def test_images_over_the_context_are_refused_before_decoding(vision_server, monkeypatch):
    """The images' tokens, known from their headers, count against the context with the text and max_tokens:
    the 400 comes before any image is decoded (an 8 MiB body of one-colour PNGs once asked for ~40 GiB)."""
    from qwen35.server import images

    base, model, _ = vision_server
    decoded, decode = [], images.decode
    monkeypatch.setattr(images, "decode", lambda img, upright=True: decoded.append(img) or decode(img, upright))
    n = model.visual.processor.num_tokens(40, 40)
    limit = model.config.max_position_embeddings
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look:"},
                                         {"type": "image_url", "image_url": {"url": data_url(picture(40, 40, 5))}}]}]
    r = httpx.post(base + "/v1/chat/completions", json={"messages": msgs, "max_tokens": limit - n}, timeout=60)
    assert r.status_code == 400 and decoded == []
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("messages", "context_length_exceeded")
    assert err["message"] == (f"the prompt holds at least {n + 1} tokens ({n} of them for its 1 image(s)); with "
                              f"max_tokens ({limit - n}) that exceeds the context of {limit} tokens; send fewer or "
                              "smaller images, shorten the prompt or lower max_tokens")


def test_the_part_at_fault_is_named_and_wrapped_base64_is_taken(vision_server):
    base, model, tok = vision_server
    good, thin = data_url(picture(40, 40, 1)), data_url(picture(2, 900, 3))
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in (good, good, thin)]
             + [{"type": "text", "text": "compare"}]}]
    with httpx.Client(timeout=120) as h:
        r = h.post(base + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 400
        err = r.json()["error"]
        assert (err["param"], err["message"]) == (
            "messages[0].content[2]", "'messages[0].content[2]': image of 900x2 has an aspect ratio above 200")
        img = picture(40, 40, 5)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        wrapped = "data:image/png;base64," + base64.encodebytes(buf.getvalue()).decode()  # 76-column lines
        ok = h.post(base + "/v1/chat/completions", json={"messages": ask(wrapped), "max_tokens": 5,
                                                          "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"] == library(model, tok, ask("x"), [img], 5).strip()
