"""qwen35 web: the static chat page, served with cross-origin isolation, answers in headless Chromium exactly as
`qwen35 generate` does (greedy, same model and prompt), running onnxruntime-web's WASM build.

The browser, Node.js and playwright-core are installed once per machine (tests/browser_setup.py, started in
the background by conftest.py); QWEN35_BROWSER=0 skips the browser test.
"""

from __future__ import annotations

import json
import os
import shutil
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
STOPPED = "Summarize this: " + "the quick brown fox jumps over the lazy dog. " * 120  # 2,287 tokens: 5 chunks
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


def _chat_in_browser(site: Path, browser_driver, shot: Path, *more: str) -> dict:
    """Serve `site` (`qwen35 web --serve`), chat on it in headless Chromium (PROMPT, then a second prompt and a
    third one stopped at once, if given) and return what tests/browser_chat.mjs reports."""
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
                              url, PROMPT, str(MAX_TOKENS), str(shot), *more], capture_output=True, text=True,
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
    page = _chat_in_browser(site, browser_driver, shot, SECOND, STOPPED)
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
    # Stop pressed as a long prompt is being read: it stops between its prefill chunks, with no token (before,
    # the whole prompt was read and a token made first), and the message comes back to the box to send again
    stopped = page["stopped"]
    assert stopped is not None and stopped["finish"] == "cancelled" and stopped["ids"] == [], page
    assert stopped["promptTokens"] - stopped["reusedTokens"] > 2 * 512 and stopped["promptBox"] == STOPPED.strip()
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


@pytest.mark.browser
def test_page_folds_opened_reasoning_and_drops_a_failed_turn(browser_driver, tmp_path):
    """app.js alone, against what worker.js posts, played by a stand-in Worker (tests/browser_chat.mjs
    --scripted; no model, so seconds): with Thinking on the prompt ends by opening <think>, so the reply is
    "reasoning</think>answer": the reasoning is folded and the next turn sends the answer as content and the
    reasoning as reasoning_content (before, 'start' was ignored: the page showed the think block as the answer
    and sent it back). A turn that fails, or is stopped before its first token, is taken back out of the
    history (before, every later turn sent the failed message again). Max tokens 0 is one token, not 256. A
    worker.js that does not load, and the page opened as a file, say so instead of "loading…" forever."""
    from qwen35.export.web import PAGE_DIR, PAGE_FILES, make_server

    page_dir = tmp_path / "page"
    page_dir.mkdir()
    for name in PAGE_FILES:
        if name != "worker.js":  # the stand-in plays it; the real Worker then fails to load it
            shutil.copyfile(PAGE_DIR / name, page_dir / name)
    server = make_server(page_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        import browser_setup

        out = subprocess.run([browser_setup.node(), str(ROOT / "tests" / "browser_chat.mjs"), str(browser_driver),
                              f"http://127.0.0.1:{server.server_address[1]}/", "--scripted",
                              (page_dir / "index.html").as_uri()], capture_output=True, text=True, check=False,
                             timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    reasoning, answer = "The user asks 2+2. That is 4.", "The answer is 4."
    first = r["first"]
    assert first["sent"]["thinking"] is True and first["sent"]["maxTokens"] == 1, r
    assert r["streaming"] == {"thinkingHidden": False, "thinking": "The user ask", "answer": "", "failed": False}
    assert first["shown"] == {"thinkingHidden": False, "thinking": reasoning, "answer": answer, "failed": False}
    turn1 = [{"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": answer, "reasoning_content": reasoning}]
    failed = r["failed"]
    assert failed["sent"]["messages"] == turn1 + [{"role": "user", "content": "And 3+3?"}]
    assert failed["sent"]["maxTokens"] == 256  # an empty box: the default
    assert failed["status"] == "error: OrtRun failed" and failed["error"] == "OrtRun failed"
    assert failed["shown"]["failed"] and "OrtRun failed" in failed["shown"]["answer"]
    assert failed["promptBox"] == "And 3+3?" and not failed["sendDisabled"]
    assert r["stopped"]["sent"]["messages"] == turn1 + [{"role": "user", "content": "And 4+4?"}]
    assert r["stopped"]["shown"]["failed"] and "stopped" in r["stopped"]["shown"]["answer"]
    assert r["next"]["sent"]["messages"] == turn1 + [{"role": "user", "content": "And 5+5?"}]
    assert r["noWorker"]["status"].startswith("error: the model's worker failed to start"), r
    assert r["noWorker"]["error"] and r["noWorker"]["sendDisabled"]
    assert "must be served over HTTP" in r["file"]["status"] and "--serve" in r["file"]["status"], r


def _fake_npm(tmp_path: Path) -> Path:
    """node_modules holding empty stand-ins of the files a site copies from the npm packages."""
    from qwen35.export.web import VENDOR_FILES

    modules = tmp_path / "node_modules"
    for name in VENDOR_FILES:
        (modules / name).parent.mkdir(parents=True, exist_ok=True)
        (modules / name).write_text("")
    return modules


def test_web_refuses_what_export_onnx_refuses(tmp_path, monkeypatch, capsys):
    """`qwen35 web CHECKPOINT` exports through export_onnx, which refuses, before anything is written, what
    `qwen35 export-onnx` refuses: a quantized checkpoint asked for other blocks (the site's default int8 on an
    int4 checkpoint: q4_k -> fp32 -> q8_0, accuracy lost twice) and a tokenizer with ids past the model's
    vocabulary (a site whose first turn fails in the embedding lookup's Gather). Before, web asked neither."""
    import replica

    from qwen35 import cli
    from qwen35.export import web

    monkeypatch.setattr(web, "npm_modules", lambda: _fake_npm(tmp_path))
    quantized = tmp_path / "q_int4"
    assert cli.main(["quantize", str(BUNDLED), str(quantized), "--quant", "int4"]) == 0
    _, small = replica.build_text(tmp_path / "rep", tie=True, seed=3)
    shutil.copy(BUNDLED / "tokenizer.json", small / "tokenizer.json")  # 8,192 tokens beside a 320-token model
    capsys.readouterr()
    site = tmp_path / "site"
    for model, needle in ((quantized, "is already quantized (int4); export it as --quant int4 or fp32"),
                          (small, "the tokenizer has 8192 tokens but the model's vocab_size is 320")):
        rc = cli.main(["web", str(model), str(site)])
        err = capsys.readouterr().err
        assert rc == 1 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not site.exists()  # the folder it made is taken back


def test_web_builds_a_site_inside_its_export_dir(tmp_path, monkeypatch, capsys):
    """`qwen35 web EXPORT EXPORT/site`: the site's model/ gets the files the manifest names, not a copy of the
    whole folder (which held the site being written: a RecursionError, before)."""
    from qwen35 import cli
    from qwen35.export import web

    monkeypatch.setattr(web, "npm_modules", lambda: _fake_npm(tmp_path))
    export = tmp_path / "exp"
    export.mkdir()
    names = ["prefill.onnx", "decode.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja"]
    for name in names + ["notes.txt"]:
        (export / name).write_text(name)
    manifest = {"graphs": {"prefill": {"file": "prefill.onnx"}, "decode": {"file": "decode.onnx"}},
                "external_data": "model.onnx.data", "tokenizer": "tokenizer.json",
                "tokenizer_config": "tokenizer_config.json", "chat_template": "chat_template.jinja"}
    (export / "manifest.json").write_text(json.dumps(manifest))
    for _ in range(2):  # and built again over the first
        assert cli.main(["web", str(export), str(export / "site")]) == 0, capsys.readouterr().err
        model = export / "site" / "model"
        assert sorted(f.name for f in model.iterdir()) == sorted(["manifest.json", *names])
        assert all((model / n).read_text() == n for n in names)
        assert (export / "site" / "index.html").is_file()
