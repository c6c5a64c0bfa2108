"""Running qwen35 as of another git revision beside this checkout, for before/after benchmarks in one run.

`checkout(rev)` puts REV in a temporary worktree (removed afterwards); `python_env(code)` is the environment
and working directory that make a child process import qwen35 from there; `run_json` runs `python -c CODE`
that way and returns its last stdout line as JSON ({"error": ...} when it fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def checkout(rev: str):
    """A temporary worktree of `rev`: yields its path."""
    tmp = Path(tempfile.mkdtemp(prefix="qwen35-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp), rev], check=True,
                   capture_output=True)
    try:
        yield tmp
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp)], capture_output=True)


def python_env(code: Path | None = None) -> tuple[dict, str]:
    """(env, cwd) for a child that imports qwen35 from `code` (default: this checkout). cwd matters too:
    `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return env, str(code or ROOT)


def run_json(code: str, *args: str, code_dir: Path | None = None) -> dict:
    env, cwd = python_env(code_dir)
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])
