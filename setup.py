"""Builds mistol's CPU kernels (csrc/*.c) as a plain shared library.

Everything else about the package lives in pyproject.toml. The library has a C ABI and is
loaded with ctypes (mistol/kernels/__init__.py), so it needs neither torch nor Python
headers; it is named like an extension module only so that setuptools builds and installs
it. The AVX2 code is compiled per function (target attributes) and chosen at run time, so
no -march flag is used and the library runs on any x86-64; the same goes for the ARM
dot-product code on 64-bit ARM. Threads come from OpenMP; where the compiler has none (Apple's
clang) or MISTOL_OPENMP=0 is set, the library is built single-threaded (the `#pragma omp`
regions are compiled out and run as one thread). If no C compiler works, the install still
succeeds and mistol runs quantized layers with PyTorch ops instead.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _without_openmp(ext: Extension) -> None:
    ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
    ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]


class BuildKernels(build_ext):
    def build_extension(self, ext):
        if os.environ.get("MISTOL_OPENMP", "1").lower() in ("0", "off", "no", "false"):
            print(f"mistol: building {ext.name} without OpenMP (MISTOL_OPENMP={os.environ['MISTOL_OPENMP']})")
            _without_openmp(ext)
        try:
            super().build_extension(ext)
        except Exception as e:  # no OpenMP (e.g. Apple clang): build single-threaded instead
            if "-fopenmp" not in ext.extra_compile_args:
                raise
            print(f"mistol: building {ext.name} without OpenMP ({e})")
            _without_openmp(ext)
            super().build_extension(ext)

    def get_export_symbols(self, ext):
        return []  # not a Python module: no PyInit_ symbol to export


kernels = Extension(
    "mistol._kernels",
    sources=["csrc/abi.c", "csrc/common.c", "csrc/quant_gemv.c", "csrc/dense.c", "csrc/quantize.c",
             "csrc/mistol_decode.c", "csrc/attention.c", "csrc/kquant_gemv.c", "csrc/requantize.c"],
    depends=["csrc/mistol_abi.h", "csrc/mistol_kernels.h", "csrc/kquant.h", "csrc/attention.h"],
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fvisibility=hidden", "-fopenmp"],  # no FMA contraction: llama.cpp-exact rounding
    extra_link_args=["-fopenmp"],
    libraries=["m"],
    optional=True,  # a failed build warns; mistol then falls back to PyTorch ops
)

setup(ext_modules=[kernels], cmdclass={"build_ext": BuildKernels})
