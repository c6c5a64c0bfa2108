"""`qwen35 web`: a static site that chats with the model entirely in the browser (onnxruntime-web).

OUT_DIR gets index.html, app.js, worker.js, style.css (qwen35/export/web/), model/ (an `export-onnx`
directory: the files its manifest names) and vendor/: onnxruntime-web (WASM, and its WebGPU build),
@huggingface/tokenizers and @huggingface/jinja, copied from npm packages installed once at build time into
~/.cache/qwen35/web/ (pinned versions below). The page fetches nothing from anywhere but its own origin, so it
works offline once built.

It must be served over HTTP (a file:// page cannot fetch the wasm and the model) with the two
cross-origin-isolation headers that SharedArrayBuffer, and so WASM threads, need: `serve` sends them.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

from .onnx import ExportError

# Pinned: the page's worker is written against these APIs; 1.31 is the first onnxruntime-web whose WASM build
# has com.microsoft.LinearAttention (the graphs' Gated DeltaNet operator).
NPM_PACKAGES = {"onnxruntime-web": "1.31.1", "@huggingface/tokenizers": "0.2.0", "@huggingface/jinja": "0.5.13"}
# package file -> site path (vendor/...)
VENDOR_FILES = {
    "onnxruntime-web/dist/ort.wasm.min.mjs": "ort/ort.wasm.min.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.mjs": "ort/ort-wasm-simd-threaded.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm": "ort/ort-wasm-simd-threaded.wasm",
    "onnxruntime-web/dist/ort.webgpu.min.mjs": "ort/ort.webgpu.min.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.mjs": "ort/ort-wasm-simd-threaded.asyncify.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.wasm": "ort/ort-wasm-simd-threaded.asyncify.wasm",
    "@huggingface/tokenizers/dist/tokenizers.min.mjs": "tokenizers.min.mjs",
    "@huggingface/jinja/dist/index.js": "jinja.js",
}
PAGE_DIR = Path(__file__).with_name("web")
PAGE_FILES = ("index.html", "app.js", "worker.js", "style.css")


def cache_dir() -> Path:
    """Where npm packages are installed once (QWEN35_CACHE or ~/.cache/qwen35, as the tests' builds)."""
    root = Path(os.environ.get("QWEN35_CACHE", Path.home() / ".cache" / "qwen35"))
    key = "-".join(f"{n.replace('/', '+')}@{v}" for n, v in sorted(NPM_PACKAGES.items()))
    return root / "web" / key


def npm_modules(packages: dict[str, str] | None = None, where: Path | None = None) -> Path:
    """node_modules holding `packages` (default NPM_PACKAGES), installed with npm from its registry the first
    time and reused after (a finished install is marked by a stamp file, so an interrupted one is redone)."""
    packages = packages or NPM_PACKAGES
    where = where or cache_dir()
    stamp = where / "installed.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == packages:
        return where / "node_modules"
    if shutil.which("npm") is None:
        raise ExportError("building the web page needs npm (Node.js) once, to fetch "
                          f"{', '.join(f'{n}@{v}' for n, v in packages.items())}; install Node.js and npm")
    where.mkdir(parents=True, exist_ok=True)
    (where / "package.json").write_text(json.dumps({"name": "qwen35-web-deps", "private": True}))
    cmd = ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", "--prefix", str(where),
           *(f"{n}@{v}" for n, v in packages.items())]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ExportError(f"npm install of the web page's packages failed: {tail}")
    stamp.write_text(json.dumps(packages))
    return where / "node_modules"


def build_site(model: str | Path, out_dir: str | Path, quant: str | None = "int8", progress: bool = False) -> Path:
    """Write the site into out_dir. model: a checkpoint (exported here with `quant`: None, "int8", "int4") or
    an `export-onnx` directory (copied as it is). Returns out_dir. A build that fails takes back the out_dir
    it created (an empty or half-written site would look like one)."""
    out = Path(out_dir)
    src = Path(model)
    check_site_paths(src, out)
    modules = npm_modules()  # first: a missing npm fails in seconds, not after the export
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _fill_site(src, out, modules, quant, progress)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def check_site_paths(src: Path, out: Path) -> None:
    """Before anything is built: OUT a directory to create or fill that is not the input, and an export-onnx
    input whole (a manifest that parses and the files it names)."""
    from ..commands.common import check_output_dir

    check_output_dir(out, src)
    if (src / "manifest.json").is_file():
        check_export(src)


def check_export(src: Path) -> list[str]:
    """An `export-onnx` directory the page can run: its manifest.json parses and names files that exist.
    Returns those names, manifest.json first (what the site's model/ gets)."""
    path = src / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e}): export the model again with `qwen35 export-onnx`") \
            from None
    graphs = manifest.get("graphs") if isinstance(manifest, dict) else None
    if not isinstance(graphs, dict) or not graphs:
        raise ExportError(f"{path}: not an export-onnx manifest (no 'graphs')")
    names = [g.get("file") if isinstance(g, dict) else None for g in graphs.values()]
    names += [manifest.get(key) for key in ("external_data", "tokenizer", "tokenizer_config", "chat_template")
              if key in manifest]
    bad = [str(n) for n in names if not isinstance(n, str) or not n or not (src / n).is_file()]
    if bad:
        raise ExportError(f"{src}: files named in manifest.json are missing ({', '.join(bad)}): export the model "
                          "again with `qwen35 export-onnx`")
    return ["manifest.json", *dict.fromkeys(names)]


def _fill_site(src: Path, out: Path, modules: Path, quant: str | None, progress: bool) -> None:
    if (src / "manifest.json").is_file():
        if (out / "model").resolve() != src.resolve():
            # the files the manifest names, not the whole folder: OUT may lie inside it (a site built into
            # its own export, whose copy would copy itself: a RecursionError), beside anything else kept there
            for name in check_export(src):
                (out / "model" / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, out / "model" / name)
    else:
        from .onnx import export_onnx

        export_onnx(src, out / "model", quant=quant, progress=progress)
    for pkg_file, site_file in VENDOR_FILES.items():
        dst = out / "vendor" / site_file
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules / pkg_file, dst)
    for name in PAGE_FILES:
        shutil.copyfile(PAGE_DIR / name, out / name)


class IsolatedHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with cross-origin isolation (COOP/COEP) and the MIME types ES modules and wasm need."""

    extensions_map: ClassVar[dict[str, str]] = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format, *args):  # quiet: the command prints the URL, not every request
        pass


def make_server(site: str | Path, host: str = "127.0.0.1", port: int = 8000,
                built: bool = True) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server for `site` (port 0: any free port; the bound one is server.server_address[1]).
    built=False: the site is built after the port is taken (so a busy port fails before the build); a bad
    host or a port that cannot be bound is an ExportError naming them."""
    if built and not (Path(site) / "index.html").is_file():
        raise ExportError(f"{site}: no index.html (build the site with `qwen35 web MODEL {site}` first)")
    handler = functools.partial(IsolatedHandler, directory=str(site))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as e:  # socket.gaierror (an unknown host) is one too
        raise ExportError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
