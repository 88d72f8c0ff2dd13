"""llama.cpp as a reference in tests: its own HF→GGUF converter, its quantizer and its tokenizer.

The converter (`convert_hf_to_gguf.py` with its `conversion/` package and `gguf-py/`) is not in
llama-cpp-python's wheel, only in its source distribution, under `vendor/llama.cpp/`. We take
the sdist of the installed version from the package index once and keep those three pieces in a
cache directory (`MISTOL_LLAMA_CPP_SRC` points at an unpacked `vendor/llama.cpp` instead).
Tests that need them skip, saying why, when neither llama-cpp-python nor the index is there.

The converter names a byte-level BPE tokenizer's pre-tokenizer by hashing the ids it gives for
a fixed text, so a tokenizer trained in a test is unknown to it; `convert(..., pre=NAME)` runs the
unmodified converter with that one lookup answered by NAME (the pre-tokenizer the test trained
the vocabulary with).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

PINNED_VERSION = "0.3.36"  # the llama-cpp-python that pyproject's test extra pins
_KEPT = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mistol-tests"


def llama_cpp():
    """The llama_cpp module, or a skip."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the test extra installs it)")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:
        return PINNED_VERSION


def source_dir() -> Path:
    """llama.cpp's source directory holding convert_hf_to_gguf.py, fetched once (or a skip)."""
    if os.environ.get("MISTOL_LLAMA_CPP_SRC"):
        return Path(os.environ["MISTOL_LLAMA_CPP_SRC"])
    version = _version()
    root = _CACHE / f"llama.cpp-{version}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
             f"llama-cpp-python=={version}"],
            capture_output=True, text=True, timeout=600,
        )
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not archives:
            pytest.skip(f"llama.cpp's converter is not available (pip download llama-cpp-python=={version} failed)")
        staging = Path(tempfile.mkdtemp(dir=_mkdir(_CACHE)))
        with tarfile.open(archives[0]) as tar:
            prefix = f"{archives[0].name[: -len('.tar.gz')]}/vendor/llama.cpp/"
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and m.name[len(prefix):].startswith(_KEPT):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tar.extractall(staging, members=members, filter="data")
        try:
            staging.rename(root)  # atomic: a concurrent test run keeps whichever copy landed first
        except OSError:
            pass
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


_WRAPPER = """
import runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src, src + "/gguf-py"]
if pre:
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(hf_dir: Path, out: Path, outtype: str = "f32", pre: str | None = None) -> Path:
    """`convert_hf_to_gguf.py hf_dir --outfile out --outtype outtype`, llama.cpp's own converter."""
    src = source_dir()
    got = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(src), pre or "", str(hf_dir), "--outfile", str(out),
         "--outtype", outtype],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_LOCAL_GGUF": "1"},
    )
    if got.returncode:
        raise AssertionError(f"convert_hf_to_gguf.py failed:\n{got.stderr[-4000:]}")
    return out


def quantize(src: Path, dst: Path, ftype: str) -> Path:
    """llama.cpp's own quantizer: `ftype` is a llama_ftype name such as "Q4_K_M", "Q6_K", "Q4_1"."""
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), params):
        raise AssertionError(f"llama_model_quantize to {ftype} failed")
    return dst


def model(path: Path, **kw):
    """llama.cpp's model of the GGUF file at `path` (`Llama(model_path=path, **kw)`), with its
    extra buffer types off on a CPU with AMX, whose matrix product crashes there in VMs
    (mistol.bench.engines.llama_cpp_models_without_amx)."""
    from mistol.bench.engines import llama_cpp_models_without_amx

    lib = llama_cpp()
    with llama_cpp_models_without_amx():
        return lib.Llama(model_path=str(path), **kw)


def vocab(path: Path):
    """A llama.cpp model holding only the file's vocabulary: `.tokenize(bytes, add_bos, special)`,
    `.detokenize(ids)`."""
    lib = llama_cpp()
    return lib.Llama(model_path=str(path), vocab_only=True, verbose=False)
