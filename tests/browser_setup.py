"""Headless Chromium and playwright-core for tests/test_web.py, installed once per machine in the background.

Chromium is Debian's `chromium` package (apt-get, as root: Debian's registry only), Node.js likewise where it
is missing; playwright-core (the driver without a browser download of its own) comes from the npm registry
into ~/.cache/qwen35/web/ like the page's own packages (qwen35/export/web.py). conftest.py starts
`start_install` at collection when a `browser` test is selected, so the apt-get overlaps other tests; the
fixture waits for it. QWEN35_BROWSER=0 skips the browser tests instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from qwen35.export.web import cache_dir, npm_modules

PLAYWRIGHT = {"playwright-core": "1.65.2"}
# playwright-core 1.65 declares Node.js >= 20; Debian 12's own nodejs is 18. Then a Node 20 binary comes from
# the npm registry (the node-linux-<arch> packages carry the official build) into the cache, run in its place.
NODE20 = "20.20.2"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LOG = cache_dir().parent / "browser-install.log"


def playwright_dir() -> Path:
    return cache_dir().parent / "playwright-core@{}".format(PLAYWRIGHT["playwright-core"])


def node_major(node: str = "node") -> int:
    """Node.js's major version (0: none)."""
    if shutil.which(node) is None or shutil.which("npm") is None:
        return 0
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout
    return int(out.strip().lstrip("v").split(".")[0] or 0)


def _node20_path() -> Path:
    import platform

    arch = {"x86_64": "x64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return cache_dir().parent / f"node@{NODE20}" / "node_modules" / f"node-linux-{arch}" / "bin" / "node"


def node() -> str:
    """The Node.js that runs the browser driver: the system's if >= 20, else the cached Node 20."""
    if node_major() >= 20:
        return "node"
    return str(_node20_path())


def missing() -> list[str]:
    """What the browser tests still need: 'chromium', 'node', 'playwright-core'."""
    out = [] if Path(CHROMIUM).is_file() else ["chromium"]
    out += [] if node_major() and (node_major() >= 20 or _node20_path().is_file()) else ["node"]
    stamp = playwright_dir() / "installed.json"
    return out + ([] if stamp.is_file() else ["playwright-core"])


def start_install() -> subprocess.Popen | None:
    """Install what is missing in a background process (log: LOG); None when nothing is."""
    if not missing():
        return None
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG, "a") as log:
        return subprocess.Popen([sys.executable, __file__, "_install"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[1],
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def wait_install(proc: subprocess.Popen | None) -> Path:
    """Wait for start_install's process; returns the node_modules holding playwright-core."""
    if proc is not None and proc.wait() != 0:
        raise RuntimeError(f"browser test setup failed (rc {proc.returncode}); see {LOG}:\n"
                           f"{LOG.read_text(errors='replace')[-1500:]}")
    still = missing()
    if still:
        raise RuntimeError(f"browser test setup incomplete, missing {still}; see {LOG}")
    return playwright_dir() / "node_modules"


def _install() -> None:
    apt = [p for p, needed in (("chromium", "chromium" in missing()), ("nodejs", node_major() == 0),
                               ("npm", node_major() == 0)) if needed]
    if apt:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit(f"need Debian packages {apt}: run `apt-get install -y {' '.join(apt)}` as root")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *apt], check=True, env=env)  # (fonts come recommended)
    if node_major() < 20 and not _node20_path().is_file():  # Debian 12's nodejs is 18: Node 20 from npm
        import platform

        arch = {"x86_64": "x64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        npm_modules({f"node-linux-{arch}": NODE20}, cache_dir().parent / f"node@{NODE20}")
        if not _node20_path().is_file():
            raise SystemExit(f"playwright-core needs Node.js >= 20, found {node_major()}, and the npm package "
                             f"node-linux-{arch}@{NODE20} did not provide one")
    npm_modules(PLAYWRIGHT, playwright_dir())
    print("browser test setup done", flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["_install"]:
    _install()
