"""mistol's compiled CPU kernels (csrc/), called through ctypes.

The library is built by the package's build (setup.py) as `mistol/_kernels*.so`. Which
implementation runs is chosen once, from `MISTOL_KERNELS`:

- `auto` (default): AVX512-VNNI dot products where the CPU has them, else AVX2+FMA+F16C,
  else portable scalar C;
- `avx512vnni` / `avx2` / `scalar`: force one (tests compare them);
- `torch`: do not use the library at all (PyTorch ops: dequantize, then matmul).

When the library is missing or fails to load, mistol says so once on stderr and uses
PyTorch ops. `use(impl)` switches at run time (a context manager, for tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys

import torch

FORMAT_IDS = {"int8": 1, "int4": 2}
IMPLS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512vnni": 3}
_IMPL_NAMES = {v: k for k, v in IMPLS.items()}

_ERRORS = {-1: "K must be a positive multiple of 32", -2: "unknown format", -3: "out of memory",
           -4: "this CPU lacks the instructions of the chosen implementation", -5: "bad shape"}

_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_loaded = False
_impl = os.environ.get("MISTOL_KERNELS", "auto").lower()
_noticed = False


def _load() -> ctypes.CDLL | None:
    global _lib, _load_error, _loaded
    if _loaded:
        return _lib
    _loaded = True
    try:
        spec = importlib.util.find_spec("mistol._kernels")
        if spec is None or not spec.origin:
            raise OSError("mistol/_kernels*.so is not built (reinstall with `pip install -e .` and a C compiler)")
        lib = ctypes.CDLL(spec.origin)
        if lib.mistol_kernels_abi() != 7:
            raise OSError(f"{spec.origin}: stale build (ABI {lib.mistol_kernels_abi()}); reinstall mistol")
    except (OSError, AttributeError) as e:
        _load_error = str(e)
        return None
    i64, vp, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.mistol_gemm_many.argtypes = [c_int, vp, i64, i64, c_int, vp, vp, vp, vp, i64, c_int, c_int]
    lib.mistol_gemm_many.restype = c_int
    lib.mistol_quantize.argtypes = [c_int, vp, c_int, i64, i64, vp, c_int, c_int]
    lib.mistol_quantize.restype = c_int
    lib.mistol_dense_many.argtypes = [c_int, vp, c_int, i64, i64, c_int, vp, vp, vp, vp, i64, c_int]
    lib.mistol_dense_many.restype = c_int
    lib.mistol_dequantize.argtypes = [c_int, vp, i64, i64, vp, c_int, c_int]
    lib.mistol_dequantize.restype = c_int
    lib.mistol_decode_layer.argtypes = [vp, vp, vp, vp, vp, ctypes.c_float, c_int, c_int]
    lib.mistol_decode_layer.restype = c_int
    lib.mistol_best_impl.restype = c_int
    _lib = lib
    return lib


def available() -> bool:
    """True when quantized matmuls run on the compiled kernels (else: PyTorch ops)."""
    if _impl == "torch":
        return False
    if _load() is None:
        _notice()
        return False
    return True


def _notice() -> None:
    global _noticed
    if not _noticed:
        _noticed = True
        print(f"mistol: compiled CPU kernels unavailable ({_load_error}); quantized layers use "
              "slower PyTorch ops", file=sys.stderr)


def impl_name() -> str:
    """The implementation quantized matmuls use now: avx512vnni, avx2, scalar or torch."""
    if not available():
        return "torch"
    return _impl if _impl in IMPLS and _impl != "auto" else best_impl()


def best_impl() -> str:
    """The fastest implementation this CPU runs ("torch" without the library)."""
    return _IMPL_NAMES.get(_lib.mistol_best_impl(), "scalar") if available() else "torch"


@contextlib.contextmanager
def use(impl: str):
    """Run the enclosed code with `impl` (auto, avx512vnni, avx2, scalar or torch)."""
    global _impl
    if impl not in (*IMPLS, "torch"):
        raise ValueError(f"unknown kernel implementation {impl!r} ({', '.join([*IMPLS, 'torch'])})")
    before, _impl = _impl, impl
    try:
        yield
    finally:
        _impl = before


def gemm(fmt: str, x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """y[M, n] = x[M, K] @ W^T for W packed by `mistol.quant` (x: float32, contiguous, CPU)."""
    return gemm_many(fmt, x, [(packed, n)])


def gemm_many(fmt: str, x: torch.Tensor, weights: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """x[M, K] times several packed matrices (packed [tiles, groups, blocks per tile, bytes],
    n rows) that share the input, in one call: their outputs side by side, y[M, sum of n]."""
    m, k = x.shape
    count, ptrs, ns = _matrices([packed for packed, _ in weights], [n for _, n in weights])
    tiles = (ctypes.c_int64 * count)(*(packed.shape[2] for packed, _ in weights))
    y = torch.empty(m, sum(ns), dtype=torch.float32)
    rc = _lib.mistol_gemm_many(FORMAT_IDS[fmt], x.data_ptr(), m, k, count, ptrs, ns, tiles, y.data_ptr(), y.shape[1],
                               torch.get_num_threads(), IMPLS.get(_impl, 0))
    if rc != 0:
        raise RuntimeError(f"mistol_gemm_many({fmt}, M={m}, K={k}, N={list(ns)}): {_ERRORS.get(rc, rc)}")
    return y


def _matrices(tensors: list[torch.Tensor], rows: list[int]) -> tuple[int, ctypes.Array, ctypes.Array]:
    """Several matrices as the C functions take them: count, their addresses, their rows."""
    count = len(tensors)
    return count, (ctypes.c_void_p * count)(*(t.data_ptr() for t in tensors)), (ctypes.c_int64 * count)(*rows)


DENSE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dense_many(x: torch.Tensor, weights: list[torch.Tensor], x_is_bf16: bool = False) -> torch.Tensor:
    """x[M, K] (float32, contiguous) times float weights (float32/bfloat16/float16, one
    dtype, contiguous) that share the input, in one call: y[M, sum of n], float32. Each
    weight is [n, K], or [K / t, n, t] held in tiles of t values along K (see
    `mistol.model.linear.TiledLinear`). `x_is_bf16`: x's values are all bf16 numbers (bf16
    weights may then use the CPU's bf16 dot products)."""
    m, k = x.shape
    count, ptrs, ns = _matrices(weights, [w.shape[-2] for w in weights])
    tiles = (ctypes.c_int64 * count)(*(w.shape[-1] for w in weights))
    y = torch.empty(m, sum(ns), dtype=torch.float32)
    rc = _lib.mistol_dense_many(DENSE_DTYPES[weights[0].dtype], x.data_ptr(), int(x_is_bf16), m, k, count, ptrs, ns,
                                tiles, y.data_ptr(), y.shape[1], torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"mistol_dense_many(M={m}, K={k}, N={list(ns)}): {_ERRORS.get(rc, rc)}")
    return y


_OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def dequantize(fmt: str, packed: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed groups in row order, untiled [G, K/32, bytes] (CPU, contiguous) -> rows [G * 8, K]
    in float32 or bfloat16 (into `out` if given: contiguous, of that shape and dtype)."""
    groups, nb, _ = packed.shape
    if out is None:
        out = torch.empty(groups * 8, nb * 32, dtype=dtype)
    assert out.shape == (groups * 8, nb * 32) and out.dtype == dtype and out.is_contiguous()
    rc = _lib.mistol_dequantize(FORMAT_IDS[fmt], packed.data_ptr(), groups, nb * 32, out.data_ptr(),
                                _OUT_DTYPES[dtype], torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"mistol_dequantize({fmt}, K={nb * 32}): {_ERRORS.get(rc, rc)}")
    return out


_SOURCE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def quantize(fmt: str, w: torch.Tensor, out: torch.Tensor, packed: bool) -> None:
    """Rows of w [n, K] -> llama.cpp Q8_0/Q4_0 blocks in `out`: in row order, or with
    `packed` in `mistol.quant`'s layout. w: CPU, contiguous, float32/bfloat16/float16."""
    n, k = w.shape
    rc = _lib.mistol_quantize(FORMAT_IDS[fmt], w.data_ptr(), _SOURCE_DTYPES[w.dtype], n, k, out.data_ptr(),
                              int(packed), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"mistol_quantize({fmt}, K={k}): {_ERRORS.get(rc, rc)}")


def format_ids(fmts: list[str]) -> ctypes.Array:
    """The kernels' ids of weight formats ("int8", "int4"), as a C array."""
    return (ctypes.c_int * len(fmts))(*(FORMAT_IDS[f] for f in fmts))


def decode_layer(fmts: ctypes.Array, tiles: ctypes.Array, x: torch.Tensor, pointers: ctypes.Array,
                 dims: ctypes.Array, eps: float) -> None:
    """x [hidden] (float32, contiguous, CPU) += one decoder layer for one new token, with
    quantized weights: see csrc/mistol_decode.c for what `fmts` (`format_ids` of the seven
    weights), `tiles` (their blocks per tile), `pointers` and `dims` hold."""
    rc = _lib.mistol_decode_layer(fmts, tiles, x.data_ptr(), pointers, dims, eps, torch.get_num_threads(),
                                  IMPLS.get(_impl, 0))
    if rc != 0:
        raise RuntimeError(f"mistol_decode_layer(dims={list(dims)}): {_ERRORS.get(rc, rc)}")
