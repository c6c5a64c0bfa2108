"""`qwen35 <command>`: one entry point; each command module has setup_parser() and main(args)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import Qwen35Error

COMMANDS = {
    "generate": "qwen35.commands.generate",
    "chat": "qwen35.commands.chat",
    "serve": "qwen35.commands.serve",
    "train": "qwen35.commands.train",
    "bench": "qwen35.commands.bench",
    "info": "qwen35.commands.info",
    "replica": "qwen35.commands.replica",
    "quantize": "qwen35.commands.quantize",
    "export": "qwen35.commands.export",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen35", description="Run, chat with, serve and train Qwen3.5 models.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, mod_name in COMMANDS.items():
        mod = importlib.import_module(mod_name)
        mod.setup_parser(sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0]))
        modules[name] = mod
    args = parser.parse_args(argv)
    try:
        return modules[args.command].main(args) or 0
    except Qwen35Error as e:
        print(f"qwen35: error: {e}", file=sys.stderr)
        return 1
