import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import replica  # noqa: E402

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture
def without_avx512(monkeypatch):
    """A CPU the AVX512 library cannot run on (most laptops): bind_kernels binds the portable library."""
    from qwen35.ops import kernels

    if not kernels.portable_available():
        pytest.skip(f"portable kernels unavailable: {kernels.portable_reason()}")
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "this CPU lacks AVX512-BF16 or AVX512-VNNI")
    from qwen35.quant import weight as qw

    monkeypatch.setattr(qw, "_auto_gemm", [])  # found again as such a CPU finds it: "portable" where AVX2 runs


@pytest.fixture(scope="session")
def vlm_replicas(tmp_path_factory):
    """value_mult -> (hf_model, checkpoint path), built once per session."""
    out = {}
    for mult in (1, 2, 3):
        out[mult] = replica.build_vlm(tmp_path_factory.mktemp(f"vlm{mult}"), value_mult=mult, seed=mult)
    return out


@pytest.fixture(scope="session")
def vision_replica(tmp_path_factory):
    """(hf_model, path): a composite replica whose vision tower has two blocks (image tests)."""
    return replica.build_vlm(tmp_path_factory.mktemp("vision"), value_mult=2, seed=5,
                             vision={**replica.VISION, "depth": 2})


@pytest.fixture(scope="session")
def vision_chat_model(tmp_path_factory):
    """(hf_model, path): a composite replica with the real tokenizer (image input through API, CLI, server)."""
    return replica.build_vision_chat_model(tmp_path_factory.mktemp("vision_chat") / "model")


@pytest.fixture(scope="session")
def tied_replica(tmp_path_factory):
    return replica.build_text(tmp_path_factory.mktemp("tied"), tie=True, seed=7)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    return replica.build_chat_model(tmp_path_factory.mktemp("chat") / "model")


# ---- llama.cpp, the real thing: built once per machine, in the background, while the other tests run ----
# benchmarks/llamacpp.py is the one place that builds llama-cpp-python (from source, its own venv, a
# machine-wide cache) and has it convert, quantize and run GGUFs; the tests marked `llamacpp` use it. Such
# tests are moved to the end of the run, and the build starts at collection (niced), so on a fresh machine
# its 10-15 minutes overlap the rest of the suite. QWEN35_LLAMACPP=0 skips them instead (a machine without
# PyPI access, or a quick local run).
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def pytest_configure(config):
    config.addinivalue_line("markers", "llamacpp: compares with llama.cpp itself (builds llama-cpp-python once)")
    config.addinivalue_line("markers", "browser: drives headless Chromium (tests/browser_setup.py installs it once)")


def pytest_collection_modifyitems(config, items):
    ours = [i for i in items if i.get_closest_marker("llamacpp") is None]
    theirs = [i for i in items if i.get_closest_marker("llamacpp") is not None]
    items[:] = ours + theirs
    config._llamacpp_build = None
    if theirs and os.environ.get("QWEN35_LLAMACPP", "1") != "0":
        config._llamacpp_build = _llamacpp_module().start_install()
    # Chromium (apt) and playwright-core (npm) for the browser tests, in the background like llama.cpp
    config._browser_install = None
    if any(i.get_closest_marker("browser") for i in items) and os.environ.get("QWEN35_BROWSER", "1") != "0":
        import browser_setup

        config._browser_install = browser_setup.start_install()


def _llamacpp_module():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import llamacpp

    return llamacpp


@pytest.fixture(scope="session")
def llamacpp(pytestconfig):
    """benchmarks/llamacpp.py, once llama-cpp-python is built (waits for the build collection started)."""
    if os.environ.get("QWEN35_LLAMACPP", "1") == "0":
        pytest.skip("QWEN35_LLAMACPP=0")
    mod = _llamacpp_module()
    mod.wait_install(getattr(pytestconfig, "_llamacpp_build", None) or mod.start_install(),
                     say=lambda m: print(m, file=sys.__stderr__, flush=True))
    return mod
