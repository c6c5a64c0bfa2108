"""The portable kernels' vector helpers (qwen35/ops/kernels/portable_simd.h) on every instruction set they have a
path for, including ARM's, which no test machine here is: tests/portable_simd_check.cpp checks each helper
against its scalar definition, built for x86-64 (the generic code), x86-64-v3 (AVX2) and this CPU, and cross-built
for ARMv8.2 with sdot and plain ARMv8 (generic) and run under qemu. The whole portable library (portable_kernels.cpp,
portable_layers.cpp, topk_kernels.cpp) is compiled for both ARM targets too (syntax and types, against torch's
headers), so an ARM build never breaks unseen.

The ARM tools are Debian's g++-aarch64-linux-gnu and qemu-user-static, installed (as root, Debian's registry
only) when missing, as the browser tests install Chromium; QWEN35_CROSS=0 skips these tests instead."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen35.ops import kernels

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent / "qwen35" / "ops" / "kernels"
CHECK = HERE / "portable_simd_check.cpp"
FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-Wno-psabi", f"-I{KERNELS}"]
ARM = {"armv8.2-a+dotprod": "sdot", "armv8-a": "generic"}
PORTABLE = ["portable_kernels.cpp", "portable_layers.cpp", "portable_gemm.cpp", "topk_kernels.cpp"]  # the library
CROSS, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64-static"


def build_and_run(compiler: str, march: str, out: Path, runner: list[str]) -> str:
    exe = out / f"check-{march.replace('+', '_')}"
    static = ["-static"] if runner else []  # run by qemu: no ARM shared libraries here
    subprocess.run([compiler, *FLAGS, f"-march={march}", *static, str(CHECK), "-o", str(exe)], check=True,
                   capture_output=True, text=True, timeout=300)
    run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-2000:] + run.stderr[-1000:]
    return run.stdout.splitlines()[0]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None,
                    reason="x86 targets, built with g++")
@pytest.mark.parametrize("march,needs,path", [("x86-64", set(), "generic"),
                                              ("x86-64-v3", {"avx2", "fma", "f16c", "bmi2"}, "AVX2"),
                                              ("native", set(), None)])
def test_helpers_on_x86_targets(march, needs, path, tmp_path):
    if not needs <= kernels.cpu_flags():
        pytest.skip(f"this CPU cannot run {march} code")
    line = build_and_run("g++", march, tmp_path, [])
    if path:
        assert line == f"dot products: {path}"


def install_debian(missing: list[str], opt_out: str) -> None:
    """Debian packages `missing` installed with apt-get (root only, Debian's registry only), as the browser tests
    install Chromium; else the test fails saying what to run."""
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"need Debian packages {missing}: run `apt-get install -y {' '.join(missing)}` as root "
                    f"(or {opt_out} to skip these checks)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=900"]  # the browser tests' installer may hold dpkg's lock meanwhile
    if subprocess.run(["apt-get", *lock, "install", "-y", "-qq", *missing], env=env, capture_output=True,
                      check=False).returncode:
        subprocess.run(["apt-get", *lock, "update", "-qq"], env=env, check=True, capture_output=True)
        subprocess.run(["apt-get", *lock, "install", "-y", "-qq", *missing], env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def arm_tools():
    if os.environ.get("QWEN35_CROSS") == "0":
        pytest.skip("QWEN35_CROSS=0")
    install_debian([p for p, tool in (("g++-aarch64-linux-gnu", CROSS), ("qemu-user-static", QEMU))
                    if not shutil.which(tool)], "QWEN35_CROSS=0")
    return True


def llvm_libomp() -> Path | None:
    """The directory of LLVM's OpenMP runtime (libomp.so) beside clang, or None."""
    try:
        res = subprocess.run(["clang++", "-print-resource-dir"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    lib = Path(res.strip()).parents[1]  # <llvm>/lib/clang/<version>
    return lib if (lib / "libomp.so").exists() else None


@pytest.fixture(scope="module")
def clang_tools():
    """clang, every Mac's compiler (Apple's), and LLVM's OpenMP runtime, the one torch ships for macOS."""
    if os.environ.get("QWEN35_CROSS") == "0":
        pytest.skip("QWEN35_CROSS=0")
    install_debian([p for p, ok in (("clang", shutil.which("clang++")), ("libomp-dev", llvm_libomp())) if not ok],
                   "QWEN35_CROSS=0")
    return llvm_libomp()


@pytest.mark.parametrize("march", list(ARM))
def test_helpers_on_arm_under_qemu(march, arm_tools, tmp_path):
    assert build_and_run(CROSS, march, tmp_path, [QEMU, "-cpu", "max"]) == f"dot products: {ARM[march]}"


@pytest.mark.parametrize("march", list(ARM))
@pytest.mark.parametrize("source", PORTABLE)
def test_the_kernels_compile_for_arm(march, source, arm_tools):
    from torch.utils.cpp_extension import include_paths

    out = subprocess.run([CROSS, "-std=c++17", "-fsyntax-only", "-O3", f"-march={march}", "-ffp-contract=off",
                          "-DQWEN35_PORTABLE_LIBRARY", "-Werror=return-type", *[f"-I{p}" for p in include_paths()], str(KERNELS / source)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("source", PORTABLE)
def test_the_kernels_compile_with_clang_for_apple_silicon(source, arm_tools, clang_tools):
    """Apple's clang for an M1 with macOS's OpenMP flag (kernels.openmp_variants), against torch's headers and
    Debian's ARM C++ library (no macOS SDK here). GCC-only attributes are errors: clang ignores them, which is how
    a clang build had fused the quantizers' multiply-adds (fp_contract.h)."""
    from torch.utils.cpp_extension import include_paths

    out = subprocess.run(["clang++", "--target=aarch64-linux-gnu", "-mcpu=apple-m1", "-std=c++17", "-fsyntax-only",
                          "-O3", "-ffp-contract=off", "-DQWEN35_PORTABLE_LIBRARY", "-Xclang", "-fopenmp",
                          "-Werror=return-type", "-Werror=unknown-attributes", *[f"-I{p}" for p in include_paths()],
                          str(KERNELS / source)], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="clang builds for this x86 CPU")
def test_a_clang_build_passes_the_portable_kernel_tests(clang_tools, tmp_path):
    """Both libraries built by clang, as on a Mac (OpenMP as macOS takes it: the flag for the compiler proper and
    an explicit -lomp, here LLVM's runtime), pass tests/test_portable_kernels.py in a process of their own. Two
    defects only a clang build showed: loading the second library aborted (an anonymous namespace's DecodePlan was
    one type to torch in both: decode_plan.h), and the AVX512 library's q6_k quantizer wrote other bytes
    (fp_contract.h)."""
    plugin = tmp_path / "macos_openmp.py"
    plugin.write_text("from qwen35.ops import kernels\n"
                      f"LIB = {str(clang_tools)!r}\n"
                      "kernels.openmp_variants = lambda: [([\"-Xclang\", \"-fopenmp\"], "
                      "[f\"-L{LIB}\", \"-lomp\", f\"-Wl,-rpath,{LIB}\"])]\n")
    env = {**os.environ, "CXX": "clang++", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("QWEN35_PORTABLE_MARCH", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "-p",
                          "macos_openmp", str(HERE / "test_portable_kernels.py"), "-k",
                          "not other_instruction_sets and not refuses_this_cpu"],
                         env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=1200, check=False)
    said = out.stdout[-4000:] + out.stderr[-3000:]
    assert out.returncode == 0, said
    assert " passed" in out.stdout and " skipped" not in out.stdout and " failed" not in out.stdout, said
    built = [p.name for p in (tmp_path / "ext").glob("qwen35_*/*.so")]  # built here, not another build loaded
    assert any(n.startswith("qwen35_portable_") for n in built) and not any("_serial_" in n for n in built), built
