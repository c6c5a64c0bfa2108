"""Build a static web chat that runs the model in the browser: `qwen35 web MODEL OUT_DIR [--serve]`.

MODEL is a checkpoint (exported to ONNX first, --quant int8 by default) or an `export-onnx` directory. The
page runs onnxruntime-web in a worker (WebGPU when the browser has an adapter, WASM otherwise); its npm
packages are fetched once at build time, never at page load. --serve serves it on localhost with the
cross-origin-isolation headers WASM threads need and prints the URL. See qwen35/export/web.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def setup_parser(p: argparse.ArgumentParser) -> None:
    from .common import integer

    p.add_argument("model", help="checkpoint directory, Hugging Face repo id, or an export-onnx directory")
    p.add_argument("out_dir", type=Path, help="output directory (the site)")
    p.add_argument("--quant", choices=("int8", "int4", "q8_0", "q4_0", "fp32"), default="int8",
                   help="weights of a checkpoint's export (as export-onnx --quant): int8 (default), int4, q8_0, "
                        "q4_0 or fp32 (ignored for an export-onnx directory, which is used as it is)")
    p.add_argument("--serve", action="store_true", help="serve the site on localhost after building it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=integer(0, 65535), default=8000, help="port for --serve (0: any free port)")


def main(args: argparse.Namespace) -> int:
    from ..export.web import build_site, check_site_paths, make_server

    check_site_paths(Path(args.model), args.out_dir)
    # the port first: a busy port or an unknown host fails in a second, not after the build
    server = make_server(args.out_dir, args.host, args.port, built=False) if args.serve else None
    try:
        site = build_site(args.model, args.out_dir, quant=None if args.quant == "fp32" else args.quant,
                          progress=True)
    except BaseException:
        if server is not None:
            server.server_close()
        raise
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    print(f"wrote {site} ({size / 2**20:.1f} MiB)", flush=True)
    if server is not None:
        host, port = server.server_address[:2]
        print(f"serving {site} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
    return 0
