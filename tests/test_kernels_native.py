"""The compiled kernels on CPUs and builds this machine is not: 64-bit ARM under emulation,
and a build without OpenMP (as with Apple's clang).

tests/csrc/kernel_check.c runs every SIMD implementation a CPU has against the portable
scalar C on seeded random data (the same bits where the arithmetic is the same: the
quantizers, the k-quant and legacy block kernels, the NEON int8/int4 products). For ARM
it is cross-compiled with Debian's gcc-aarch64-linux-gnu and run under qemu-aarch64
(Debian's qemu-user), as a CPU with the dot-product extension and as one without; .ci/run
installs both. Emulation says nothing about speed, which is not measured here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(str(p) for p in (ROOT / "csrc").glob("*.c")) + [str(ROOT / "tests" / "csrc" / "kernel_check.c")]
FLAGS = ["-O2", "-std=gnu11", "-ffp-contract=off", "-I", str(ROOT / "csrc")]
CROSS_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
# kernel_check.c: quantizer, 2 x (group kernel, gemm), decode layer four times (int8/int4: one
# row, two checks; several rows of one sequence; several sequences); the per-256 quantizer, 6
# row kernels, 3 repacked group kernels, one gemm, the legacy types' several rows, Q5_0 as
# int8, decode layer four times (k-quant, legacy)
CHECKS_PER_IMPL = 9 + 19
PORTABLE_CHECKS = ["ok"] * 4  # a NaN activation; Q5_0 as int8 on the portable kernels; attention (2)
DENSE_CHECKS = 3  # float32, bf16, f16 rows: reported under the best implementation's name


def run_check(cmd: list[str]) -> tuple[str, dict[str, list[str]]]:
    """Run a kernel_check build: its best implementation, and its result lines by implementation."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and not any(line.startswith("FAIL") for line in lines), out.stdout + out.stderr
    assert lines and lines[0].startswith("best "), out.stdout
    results: dict[str, list[str]] = {}
    for line in lines[1:]:
        status, impl = line.split()[:2]
        results.setdefault(impl, []).append(status)
    return lines[0].split()[1], results


@pytest.fixture(scope="module")
def arm_check(tmp_path_factory) -> Path:
    missing = [tool for tool in (CROSS_CC, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: apt-get install gcc-aarch64-linux-gnu qemu-user)")
    exe = tmp_path_factory.mktemp("arm") / "kernel_check"
    # static, so that qemu needs no aarch64 libraries; with OpenMP, so that thread counts are checked
    build = subprocess.run([CROSS_CC, *FLAGS, "-fopenmp", "-static", *SOURCES, "-lm", "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return exe


@pytest.mark.parametrize("cpu, best", [("max", "dotprod"), ("cortex-a57", "neon")])
def test_arm_kernels_give_the_scalar_codes_bits_under_emulation(arm_check, cpu, best):
    """`max` has the dot-product extension (ARMv8.2+, as every Apple M chip); the Cortex-A57
    (ARMv8.0) has not, so the run-time choice falls back to plain NEON."""
    found, results = run_check([QEMU, "-cpu", cpu, str(arm_check)])
    assert found == best
    expected = {"neon": ["ok"] * CHECKS_PER_IMPL,
                "dotprod": ["ok"] * CHECKS_PER_IMPL if best == "dotprod" else ["unavailable"]}
    expected[best] = ["ok"] * (DENSE_CHECKS + CHECKS_PER_IMPL)
    assert results["neon"] == expected["neon"] and results["dotprod"] == expected["dotprod"]
    assert results["avx2"] == results["avx512vnni"] == ["unavailable"]


def test_an_apple_like_clang_build_without_openmp_under_emulation(tmp_path):
    """clang targeting an Apple M1 (as Apple's clang does by default: the dot products are
    part of the target, no target attributes needed) and without OpenMP (which Apple's clang
    lacks), on Linux's libc: the closest to a Mac build this machine can run."""
    if shutil.which("clang") is None or shutil.which(QEMU) is None:
        pytest.skip("needs clang and qemu-aarch64 (Debian: apt-get install clang qemu-user)")
    clang = ["clang", "--target=aarch64-linux-gnu", "-mcpu=apple-m1", "-static"]
    (tmp_path / "empty.c").write_text("int main(void) { return 0; }\n")
    if subprocess.run([*clang, str(tmp_path / "empty.c"), "-o", str(tmp_path / "empty")],
                      capture_output=True).returncode != 0:
        pytest.skip("clang cannot link for aarch64 here (needs gcc-aarch64-linux-gnu's libraries)")
    exe = tmp_path / "kernel_check"
    build = subprocess.run([*clang, *FLAGS, *SOURCES, "-lm", "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    best, results = run_check([QEMU, "-cpu", "max", str(exe)])
    assert best == "dotprod"
    assert results["dotprod"] == ["ok"] * (DENSE_CHECKS + CHECKS_PER_IMPL)
    assert results["neon"] == ["ok"] * CHECKS_PER_IMPL


def test_the_kernels_build_and_agree_without_openmp(tmp_path):
    """The C sources with a compiler given no -fopenmp: the parallel regions run as one thread."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    exe = tmp_path / "kernel_check"
    build = subprocess.run([cc, *FLAGS, "-Werror=unknown-pragmas", *SOURCES, "-lm", "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    best, results = run_check([str(exe)])
    assert results[best] == ["ok"] * (DENSE_CHECKS + (CHECKS_PER_IMPL if best != "scalar" else 0))
    assert results["portable"] == PORTABLE_CHECKS


@pytest.mark.slow
def test_the_kernels_with_and_without_prefetching_ahead(tmp_path, monkeypatch):
    """The int8/int4 one-row kernels are built with and without asking for blocks ahead
    (MISTOL_PREFETCH picks, else the CPU's vendor): each passes the checks, with the same
    bits (only memory requests differ)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    exe = tmp_path / "kernel_check"
    build = subprocess.run([cc, *FLAGS, "-fopenmp", *SOURCES, "-lm", "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    runs = {}
    for value in ("0", "1"):
        monkeypatch.setenv("MISTOL_PREFETCH", value)
        runs[value] = run_check([str(exe)])
    assert runs["0"] == runs["1"]
    best, results = runs["1"]
    assert results[best] == ["ok"] * (DENSE_CHECKS + (CHECKS_PER_IMPL if best != "scalar" else 0))


def _needed_libraries(path: Path) -> str:
    return subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout


def _clang_lacks_openmp(tmp: Path) -> bool:
    (tmp / "omp.c").write_text("#include <omp.h>\nint f(void) { return omp_get_num_threads(); }\n")
    return subprocess.run(["clang", "-fopenmp", "-c", str(tmp / "omp.c"), "-o", str(tmp / "omp.o")],
                          capture_output=True).returncode != 0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ldd") is None, reason="needs Linux's ldd")
@pytest.mark.parametrize("build", ["MISTOL_OPENMP=0", "clang without OpenMP"])
def test_a_library_built_without_openmp_passes_the_kernel_tests(tmp_path, build):
    """setup.py builds the library Apple's clang gets, with no OpenMP runtime: when told to
    (MISTOL_OPENMP=0), and by itself when the compiler's -fopenmp fails (clang without
    libomp, as Apple's); the kernels' tests pass against it (loaded through
    MISTOL_KERNELS_LIB)."""
    if build == "MISTOL_OPENMP=0":
        env = {**os.environ, "MISTOL_OPENMP": "0"}
    else:
        if shutil.which("clang") is None:
            pytest.skip("clang is not installed")
        if not _clang_lacks_openmp(tmp_path):
            pytest.skip("this clang has OpenMP: its build would not fall back")
        env = {**os.environ, "CC": "clang", "LDSHARED": "clang -shared"}
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "building mistol._kernels without OpenMP" in out.stdout, out.stdout + out.stderr
    (lib,) = (tmp_path / "lib" / "mistol").glob("_kernels*")
    assert "libgomp" not in _needed_libraries(lib) and "libomp" not in _needed_libraries(lib)

    env = {**os.environ, "MISTOL_KERNELS_LIB": str(lib), "PYTHONPATH": str(ROOT)}
    probe = ("from mistol import kernels; assert kernels.available(); "
             "print(open('/proc/self/maps').read())")
    maps = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert str(lib) in maps  # this build, not the package's, was loaded
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
         "tests/test_quant.py::test_kernel_matches_dequantized_reference",
         "tests/test_quant.py::test_q8_0_blocks_holding_minus_128_are_exact",
         "tests/test_quant.py::test_tiles_change_the_layout_not_the_sums",
         "tests/test_cpu_decode.py::test_every_kernel_implementation_and_thread_count"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert re.search(r"\d+ passed", tests.stdout) and "skipped" not in tests.stdout.splitlines()[-1], tests.stdout
