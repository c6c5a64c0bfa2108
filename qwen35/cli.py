"""`qwen35 <command>`: one entry point; each command module has setup_parser() and main(args).

A bad flag is one line on stderr (exit 2), an error qwen35 reports is one line (exit 1), Ctrl-C is exit 130
and output cut short by its reader (`| head`) is exit 141, the shell's codes for SIGINT and SIGPIPE; none
prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    "verify": "qwen35.commands.verify",
    "download": "qwen35.commands.download",
    # ONNX export and the client-side web chat (qwen35/export/)
    "export-onnx": "qwen35.commands.export_onnx",
    "web": "qwen35.commands.web",
}


class Parser(argparse.ArgumentParser):
    """argparse with its error as one line (the usage is one --help away, not printed again)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="qwen35", description="Run, chat with, serve and train Qwen3.5 models.")
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
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader left: point stdout at /dev/null so the interpreter's last flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
