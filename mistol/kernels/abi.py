"""The compiled library's ABI as Python sees it, read from the library itself.

csrc/mistol_abi.h defines the ids of weight formats, implementations, dtypes and errors,
and the structs the decode layer takes; csrc/abi.c lists them by name with the structs'
sizes and their fields' offsets and sizes. `read_abi` takes every id from that list (none is written here)
and checks the ctypes mirrors below against it, so that a library built from other
sources is refused at load instead of misreading its arguments.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from ..errors import MistolError

ABI_VERSION = 20  # the version of csrc/mistol_abi.h this module mirrors


class AbiMismatch(MistolError):
    """The library does not speak the ABI this mistol was written for."""


class Constant(ctypes.Structure):
    _fields_ = [("group", ctypes.c_char_p), ("name", ctypes.c_char_p), ("value", ctypes.c_int64)]


class Matrix(ctypes.Structure):
    """mistol_matrix: one quantized matrix."""

    _fields_ = [("data", ctypes.c_void_p), ("rows", ctypes.c_int64), ("tile_blocks", ctypes.c_int64),
                ("format", ctypes.c_int32)]


def _layer_type(n_weights: int) -> type[ctypes.Structure]:
    class Layer(ctypes.Structure):
        """mistol_layer: one decoder layer's weights (in `Abi.decode_weights` order) and norms."""

        _fields_ = [("weights", Matrix * n_weights), ("norm_attn", ctypes.c_void_p), ("norm_mlp", ctypes.c_void_p),
                    ("qkv_bias", ctypes.c_void_p), ("o_bias", ctypes.c_void_p)]

    return Layer


class DecodeArgs(ctypes.Structure):
    """mistol_decode_args: everything one call of mistol_decode_layer reads."""

    _fields_ = [("layers", ctypes.c_void_p), ("layer", ctypes.c_int64), ("x", ctypes.c_void_p),
                ("cache_k", ctypes.c_void_p), ("cache_v", ctypes.c_void_p), ("cache_k_scale", ctypes.c_void_p),
                ("cache_v_scale", ctypes.c_void_p), ("cos", ctypes.c_void_p),
                ("sin", ctypes.c_void_p), ("mask", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in ("hidden", "ffn", "heads", "kv_heads", "head_dim", "capacity",
                                                      "slot", "n_keys")),
                ("eps", ctypes.c_float), ("nthreads", ctypes.c_int32), ("impl", ctypes.c_int32),
                ("cache_type", ctypes.c_int32), ("rows", ctypes.c_int64), ("kv_rows", ctypes.c_void_p)]


class KvRow(ctypes.Structure):
    """mistol_kv_row: one sequence's KV cache in a decode step of several sequences."""

    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("k_scale", ctypes.c_void_p),
                ("v_scale", ctypes.c_void_p), ("mask", ctypes.c_void_p), ("capacity", ctypes.c_int64),
                ("slot", ctypes.c_int64), ("n_keys", ctypes.c_int64)]


@dataclass(frozen=True)
class Abi:
    """The library's ids by name, and the mirrors of its structs."""

    formats: dict[str, int]  # weight formats: int8, int4
    impls: dict[str, int]  # auto, scalar, avx2, avx512vnni
    dtypes: dict[str, int]  # float32, bfloat16, float16 (torch's names)
    kv_caches: dict[str, int]  # what the decode layer's KV cache holds: f32, f16, q8_0 (--kv-cache's names)
    errors: dict[int, str]  # error code -> message
    decode_weights: tuple[str, ...]  # a layer's matrices by module name, in mistol_layer.weights order
    Layer: type[ctypes.Structure]


def check_version(found: int, origin: str = "the library") -> None:
    """Raise AbiMismatch unless `found` is the ABI version this module mirrors."""
    if found != ABI_VERSION:
        raise AbiMismatch(f"{origin} speaks kernel ABI {found}, this mistol needs {ABI_VERSION}: "
                          "rebuild it (`pip install -e .` or `python setup.py build_ext --inplace`)")


def check_layout(struct: type[ctypes.Structure], constants: dict[str, dict[str, int]]) -> None:
    """Raise AbiMismatch unless the ctypes mirror `struct` has the size and the fields (names,
    offsets and sizes) that the library lists for the C struct of the same name."""
    c_name = {"Matrix": "mistol_matrix", "Layer": "mistol_layer", "DecodeArgs": "mistol_decode_args",
              "KvRow": "mistol_kv_row"}[struct.__name__]
    sizes = constants["sizeof"]
    ours = {f"{c_name}.{name}": (getattr(struct, name).offset, getattr(struct, name).size)
            for name, *_ in struct._fields_}
    theirs = {key: (offset, constants["fieldsize"][key]) for key, offset in constants["offsetof"].items()
              if key.startswith(c_name + ".")}
    if ctypes.sizeof(struct) != sizes.get(c_name) or ours != theirs:
        raise AbiMismatch(f"{c_name} differs between the library ({sizes.get(c_name)} bytes, {theirs}) and "
                          f"mistol/kernels/abi.py ({ctypes.sizeof(struct)} bytes, {ours}): rebuild the library")


def read_constants(lib: ctypes.CDLL) -> dict[str, dict[str, int]]:
    """The library's table of named values (mistol_abi_constants), by group."""
    lib.mistol_abi_constants.restype = ctypes.POINTER(Constant)
    table = lib.mistol_abi_constants()
    groups: dict[str, dict[str, int]] = {}
    i = 0
    while table[i].group is not None:
        groups.setdefault(table[i].group.decode(), {})[table[i].name.decode()] = table[i].value
        i += 1
    return groups


def read_abi(lib: ctypes.CDLL, origin: str = "the library") -> Abi:
    """The ABI of the loaded library `lib`, after checking its version and struct layouts."""
    lib.mistol_kernels_abi.restype = ctypes.c_int
    check_version(lib.mistol_kernels_abi(), origin)
    groups = read_constants(lib)
    weights = tuple(sorted(groups["decode_weight"], key=groups["decode_weight"].get))
    if sorted(groups["decode_weight"].values()) != list(range(len(weights))):
        raise AbiMismatch(f"{origin}: the decode layer's weight indices are not 0..{len(weights) - 1}")
    abi = Abi(formats=groups["format"], impls=groups["impl"], dtypes=groups["dtype"], kv_caches=groups["kv_cache"],
              errors={code: message for message, code in groups["error"].items()}, decode_weights=weights,
              Layer=_layer_type(len(weights)))
    for struct in (Matrix, abi.Layer, DecodeArgs, KvRow):
        check_layout(struct, groups)
    return abi
