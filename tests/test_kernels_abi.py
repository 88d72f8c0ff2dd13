"""The C ABI is read from the library: ids, error messages and struct layouts come from it,
and a library of another ABI or with other struct layouts is refused at load."""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import sys

import pytest
import torch

from mistol import kernels
from mistol.errors import MistolError
from mistol.kernels.abi import (ABI_VERSION, AbiMismatch, DecodeArgs, check_layout, check_version, read_abi,
                                read_constants)

pytestmark = pytest.mark.skipif(not kernels.available(), reason="mistol's C kernels are not built")


def library() -> ctypes.CDLL:
    return ctypes.CDLL(importlib.util.find_spec("mistol._kernels").origin)


def test_another_abi_version_is_refused_in_one_line():
    check_version(ABI_VERSION)
    with pytest.raises(MistolError) as info:
        check_version(ABI_VERSION - 1, "libfoo.so")
    message = str(info.value)
    assert "\n" not in message and "libfoo.so" in message and f"ABI {ABI_VERSION - 1}" in message
    assert f"needs {ABI_VERSION}" in message and "rebuild" in message


def test_a_library_of_another_version_is_refused_before_its_tables_are_read():
    class OldLibrary:  # a build from before the constants table: only its version answers
        mistol_kernels_abi = staticmethod(lambda: ABI_VERSION - 1)

    with pytest.raises(AbiMismatch):
        read_abi(OldLibrary())


def test_the_python_tables_are_the_librarys():
    abi = read_abi(library())
    assert kernels.FORMAT_IDS == abi.formats
    assert set(abi.formats) == {"int8", "int4", "Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q5_0", "Q5_1", "Q4_Kx8", "Q5_Kx8",
                                "Q6_Kx8"}
    assert kernels.IMPLS == abi.impls and {"auto", "scalar", "avx2", "avx512vnni"} <= set(abi.impls)
    assert kernels.DENSE_DTYPES == {getattr(torch, name): i for name, i in abi.dtypes.items()}
    assert set(kernels.DENSE_DTYPES) == {torch.float32, torch.bfloat16, torch.float16}
    assert abi.decode_weights == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert "bad shape" in abi.errors.values()


def test_a_struct_mirror_that_differs_from_the_library_is_refused():
    constants = read_constants(library())
    assert constants["sizeof"]["mistol_decode_args"] == ctypes.sizeof(DecodeArgs)
    check_layout(DecodeArgs, constants)

    class DecodeArgs32(ctypes.Structure):  # "layer" as a 32-bit int (padded: the same offsets)
        _fields_ = [(name, ctypes.c_int32 if name == "layer" else kind) for name, kind in DecodeArgs._fields_]

    DecodeArgs32.__name__ = "DecodeArgs"
    with pytest.raises(AbiMismatch, match="mistol_decode_args"):
        check_layout(DecodeArgs32, constants)

    class DecodeArgsShort(ctypes.Structure):  # a field missing at the end: same offsets, not the same struct
        _fields_ = DecodeArgs._fields_[:-1]

    DecodeArgsShort.__name__ = "DecodeArgs"
    with pytest.raises(AbiMismatch):
        check_layout(DecodeArgsShort, constants)


def test_errors_are_the_librarys_messages():
    args = DecodeArgs(hidden=0)
    with pytest.raises(RuntimeError, match="bad shape"):
        kernels.decode_layer(kernels.DecodeWorkspace(), args)


def test_the_workspace_is_freed_with_its_owner():
    workspace = kernels.DecodeWorkspace()
    free = workspace._free
    assert free.alive
    del workspace
    gc.collect()
    assert not free.alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_decoding_many_tokens_does_not_grow_memory():
    from mistol.bench.models import mistol_model
    from mistol.engine import Engine, decode_step
    from mistol.model.config import ModelConfig

    def resident_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    session = Engine(mistol_model(cfg, "int4")).new_session(max_context=512)
    token = int(session.feed([1, 2, 3]).argmax())
    with torch.inference_mode():
        for step in range(450):
            if step == 50:
                before = resident_bytes()
            token = int(decode_step([session], [token])[0].argmax())
    assert resident_bytes() - before < 4 << 20
