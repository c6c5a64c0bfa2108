"""qwen35 web: the static chat page, served with cross-origin isolation, answers in headless Chromium exactly as
`qwen35 generate` does (greedy, same model and prompt), running onnxruntime-web's WASM build.

The browser, Node.js and playwright-core are installed once per machine (tests/browser_setup.py, started in
the background by conftest.py); QWEN35_BROWSER=0 skips the browser test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "qwen35" / "assets" / "model"
PROMPT = "The capital of France is"
SECOND = "And of Italy?"
MAX_TOKENS = 40


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen35", *args], capture_output=True, text=True, check=False,
                          cwd=ROOT, **kw)


def test_server_sends_isolation_headers_and_wasm_type(tmp_path):
    from qwen35.errors import Qwen35Error
    from qwen35.export.web import make_server

    with pytest.raises(Qwen35Error, match="no index.html"):
        make_server(tmp_path)
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "x.wasm").write_bytes(b"\0asm")
    (tmp_path / "w.mjs").write_text("export {}")
    server = make_server(tmp_path, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        for name, mime in (("", "text/html"), ("x.wasm", "application/wasm"), ("w.mjs", "text/javascript")):
            with urllib.request.urlopen(base + name) as r:
                assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
                assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
                assert r.headers["Content-Type"].startswith(mime)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser_driver(pytestconfig):
    """node_modules holding playwright-core, once Chromium and Node.js are installed."""
    if os.environ.get("QWEN35_BROWSER", "1") == "0":
        pytest.skip("QWEN35_BROWSER=0")
    import browser_setup

    return browser_setup.wait_install(getattr(pytestconfig, "_browser_install", None) or
                                      browser_setup.start_install())


def _chat_in_browser(site: Path, browser_driver, shot: Path, *second: str) -> dict:
    """Serve `site` (`qwen35 web --serve`), chat on it in headless Chromium (PROMPT, then `second` if given)
    and return what tests/browser_chat.mjs reports."""
    server = subprocess.Popen([sys.executable, "-m", "qwen35", "web", str(site / "model"), str(site), "--serve",
                               "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = server.stdout.readline()
            assert line, "qwen35 web --serve exited before printing its URL"
        url = line.split(" at ")[1].split()[0]
        import browser_setup

        out = subprocess.run([browser_setup.node(), str(ROOT / "tests" / "browser_chat.mjs"), str(browser_driver),
                              url, PROMPT, str(MAX_TOKENS), str(shot), *second], capture_output=True, text=True,
                             check=False, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait()


@pytest.mark.browser
def test_page_answers_like_qwen35_generate(browser_driver, tmp_path):
    site = tmp_path / "site"
    r = _cli("web", str(BUNDLED), str(site), "--quant", "fp32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {site} (")
    for f in ("index.html", "worker.js", "vendor/ort/ort.wasm.min.mjs", "vendor/tokenizers.min.mjs",
              "model/manifest.json", "model/prefill.onnx"):
        assert (site / f).is_file(), f
    for f in ("index.html", "app.js", "worker.js"):  # nothing the page loads comes from another origin
        assert "://" not in (site / f).read_text(), f
    shot = tmp_path / "chat.png"
    page = _chat_in_browser(site, browser_driver, shot, SECOND)
    assert page["error"] is None, page
    assert page["crossOriginIsolated"] is True and page["backend"] == "wasm"
    gen = _cli("generate", str(BUNDLED), "--chat", "--no-think", "--prompt", PROMPT, "--temperature", "0",
               "--presence-penalty", "0", "--max-tokens", str(MAX_TOKENS), "--json")
    assert gen.returncode == 0, gen.stderr
    expected = json.loads(gen.stdout.strip().splitlines()[-1])
    assert page["ids"] == expected["token_ids"]
    assert page["promptTokens"] == expected["prompt_tokens"]
    assert page["text"] == expected["text"]
    assert expected["text"].strip() in page["shown"]  # what the page displays
    assert page["prefillTokS"] > 0 and page["decodeTokS"] > 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    # the second turn starts from the first turn's cache: at least its whole prompt is not prefilled again (the
    # answer is rendered back with its empty think block), and it answers as qwen35 does on that conversation
    second = page["second"]
    assert second is not None and second["finish"] in ("stop", "length"), page
    assert second["prompt"].startswith(page["prompt"] + page["text"].strip())
    assert page["promptTokens"] <= second["reusedTokens"] < second["promptTokens"], second
    gen2 = _cli("generate", str(BUNDLED), "--prompt", second["prompt"], "--temperature", "0", "--presence-penalty",
                "0", "--max-tokens", str(MAX_TOKENS), "--json")
    assert gen2.returncode == 0, gen2.stderr
    expected2 = json.loads(gen2.stdout.strip().splitlines()[-1])
    assert expected2["prompt_tokens"] == second["promptTokens"]
    assert second["ids"] == expected2["token_ids"]
    print(f"browser (WASM): prefill {page['prefillTokS']:.1f} tok/s, decode {page['decodeTokS']:.1f} tok/s; second "
          f"turn {second['reusedTokens']} of {second['promptTokens']} prompt tokens reused; screenshot {shot}")


@pytest.mark.browser
def test_page_runs_a_4bit_export_as_onnxruntime_does(browser_driver, tmp_path):
    """A 4-bit export in the page: MatMulNBits, and (q4_0: the head in 4 bits too) the tied embedding read from
    the head's 4-bit blocks (export/onnx_quant.py: Gather, BitwiseAnd, BitShift in onnxruntime-web's WASM build)
    give the tokens onnxruntime's CPU provider gives on the same graphs."""
    from tokenizers import Tokenizer

    from qwen35.export.onnx_runtime import OnnxModel

    site = tmp_path / "site"
    r = _cli("web", str(BUNDLED), str(site), "--quant", "q4_0")
    assert r.returncode == 0, r.stderr
    page = _chat_in_browser(site, browser_driver, tmp_path / "chat.png")
    assert page["error"] is None and page["backend"] == "wasm", page
    ids = Tokenizer.from_file(str(site / "model" / "tokenizer.json")).encode(page["prompt"], add_special_tokens=False).ids
    assert len(ids) == page["promptTokens"]
    assert page["ids"] == OnnxModel(site / "model").greedy(ids, MAX_TOKENS)
