"""mistol's compiled CPU kernels (csrc/), called through ctypes.

The library is built by the package's build (setup.py) as `mistol/_kernels*.so`. Which
implementation runs is chosen once, from `MISTOL_KERNELS`:

- `auto` (default): on x86, AVX512-VNNI dot products where the CPU has them, else
  AVX2+FMA+F16C, else portable scalar C; on 64-bit ARM, NEON with the dot-product
  extension (sdot) where the CPU has it, else plain NEON;
- `avx512vnni` / `avx2` / `dotprod` / `neon` / `scalar`: force one (tests compare them);
- `torch`: do not use the library at all (PyTorch ops: dequantize, then matmul).

`MISTOL_KERNELS_LIB` names another build of the library to load instead of the package's
(tests use it to check a build made without OpenMP). `MISTOL_PREFETCH=0|1`, read by the
library once, decides whether the int8/int4 and dense kernels ask for their weights ahead
(by default on Intel CPUs only: csrc/common.c). `MISTOL_AMX=0`, read once too, keeps the
int8 prefill route off AMX tiles (by default it uses them where the CPU has AMX and Linux
lets the process: `int8_tiles`).

When the library is missing, fails to load or was built for another ABI (see `abi`:
every id is read from the library and its structs checked at load), mistol says so once
on stderr and uses PyTorch ops. `use(impl)` switches at run time (a context manager, for
tests). FORMAT_IDS, IMPLS and DENSE_DTYPES load the library when first read (empty
without it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import sys
import weakref

import torch

from .abi import Abi, AbiMismatch, DecodeArgs, KvRow, Matrix, read_abi

_lib: ctypes.CDLL | None = None
_abi: Abi | None = None
_load_error: str | None = None
_loaded = False
_impl = os.environ.get("MISTOL_KERNELS", "auto").lower()
_noticed = False


def _load() -> ctypes.CDLL | None:
    global _lib, _abi, _load_error, _loaded
    if _loaded:
        return _lib
    _loaded = True
    try:
        origin = os.environ.get("MISTOL_KERNELS_LIB")
        if not origin:
            spec = importlib.util.find_spec("mistol._kernels")
            if spec is None or not spec.origin:
                raise OSError("mistol/_kernels*.so is not built (reinstall with `pip install -e .` and a C compiler)")
            origin = spec.origin
        lib = ctypes.CDLL(origin)
        abi = read_abi(lib, origin)
    except (OSError, AttributeError, AbiMismatch) as e:
        _load_error = str(e)
        _set_tables(None)
        return None
    i64, vp, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.mistol_gemm_many.argtypes = [c_int, vp, i64, i64, c_int, vp, vp, vp, vp, i64, c_int, c_int]
    lib.mistol_gemm_many.restype = c_int
    lib.mistol_gemm_matrices.argtypes = [vp, i64, i64, c_int, vp, vp, i64, c_int, c_int]
    lib.mistol_gemm_matrices.restype = c_int
    lib.mistol_dequantize_rows.argtypes = [c_int, vp, i64, i64, vp, c_int, c_int]
    lib.mistol_dequantize_rows.restype = c_int
    for repack in (lib.mistol_repack_q4_k_x8, lib.mistol_repack_q5_k_x8, lib.mistol_repack_q6_k_x8):
        repack.argtypes, repack.restype = [vp, i64, i64, vp, c_int], c_int
    lib.mistol_gemm_requantized.argtypes = [c_int, vp, i64, i64, vp, i64, vp, i64, c_int]
    lib.mistol_gemm_requantized.restype = c_int
    lib.mistol_gemm_as_int8.argtypes = [c_int, vp, i64, i64, vp, i64, vp, i64, c_int, c_int]
    lib.mistol_gemm_as_int8.restype = c_int
    lib.mistol_quantize.argtypes = [c_int, vp, c_int, i64, i64, vp, c_int, c_int]
    lib.mistol_quantize.restype = c_int
    lib.mistol_pack_blocks.argtypes = [c_int, vp, i64, i64, vp, c_int]
    lib.mistol_pack_blocks.restype = c_int
    lib.mistol_dense_many.argtypes = [c_int, vp, c_int, i64, i64, c_int, vp, vp, vp, vp, i64, c_int]
    lib.mistol_dense_many.restype = c_int
    lib.mistol_dequantize.argtypes = [c_int, vp, i64, i64, vp, c_int, c_int]
    lib.mistol_dequantize.restype = c_int
    lib.mistol_decode_layer.argtypes = [vp, ctypes.POINTER(DecodeArgs)]
    lib.mistol_decode_layer.restype = c_int
    lib.mistol_workspace_new.restype = vp
    lib.mistol_workspace_free.argtypes = [vp]
    lib.mistol_best_impl.restype = c_int
    lib.mistol_int8_tiles.restype = c_int
    _lib, _abi = lib, abi
    _set_tables(abi)
    return lib


_TABLES = ("FORMAT_IDS", "IMPLS", "DENSE_DTYPES")


def _set_tables(abi: Abi | None) -> None:
    """FORMAT_IDS (weight format -> id), IMPLS (implementation -> id) and DENSE_DTYPES (torch
    dtype -> id) as module attributes: the library's, or empty without it."""
    globals().update(FORMAT_IDS=dict(abi.formats) if abi else {}, IMPLS=dict(abi.impls) if abi else {},
                     DENSE_DTYPES={getattr(torch, name): i for name, i in abi.dtypes.items()} if abi else {})


def __getattr__(name: str):
    if name not in _TABLES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load()  # sets the tables
    return globals()[name]


def abi() -> Abi:
    """The loaded library's ids and struct mirrors (the library must be `available()`)."""
    if _load() is None:
        raise RuntimeError(f"mistol's compiled kernels are unavailable ({_load_error})")
    return _abi


def _error(rc: int) -> str:
    return _abi.errors.get(rc, f"error {rc}")


def _impl_id() -> int:
    return _abi.impls.get(_impl, _abi.impls["auto"])


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
    """The implementation quantized matmuls use now: avx512vnni, avx2, dotprod, neon, scalar or torch."""
    if not available():
        return "torch"
    return _impl if _impl in _abi.impls and _impl != "auto" else best_impl()


def best_impl() -> str:
    """The fastest implementation this CPU runs ("torch" without the library)."""
    if not available():
        return "torch"
    return _best_impl()


@functools.cache
def _best_impl() -> str:  # (asked on every layer call that routes: the CPU does not change)
    return {i: name for name, i in _abi.impls.items()}.get(_lib.mistol_best_impl(), "scalar")


@functools.cache
def int8_tiles() -> bool:
    """Whether the int8 prefill route (`gemm_requantized`'s k-quants) multiplies in AMX tiles:
    an AMX CPU whose kernel lets this process use them, unless MISTOL_AMX=0 (read once)."""
    return available() and bool(_lib.mistol_int8_tiles())


@contextlib.contextmanager
def use(impl: str):
    """Run the enclosed code with `impl` (auto, avx512vnni, avx2, dotprod, neon, scalar or torch)."""
    global _impl
    names = [*(_abi.impls if _load() is not None else ["auto"]), "torch"]
    if impl not in names and _lib is not None:  # (without the library, every name means PyTorch ops)
        raise ValueError(f"unknown kernel implementation {impl!r} ({', '.join(names)})")
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
    rc = _lib.mistol_gemm_many(_abi.formats[fmt], x.data_ptr(), m, k, count, ptrs, ns, tiles, y.data_ptr(),
                               y.shape[1], torch.get_num_threads(), _impl_id())
    if rc != 0:
        raise RuntimeError(f"mistol_gemm_many({fmt}, M={m}, K={k}, N={list(ns)}): {_error(rc)}")
    return y


def gemm_matrices(x: torch.Tensor, mats: list[Matrix]) -> torch.Tensor:
    """x[M, K] (float32, contiguous, CPU) times quantized matrices of any formats (each
    made by `matrix`; their tensors kept alive by the caller) that share the input, in one
    call: their outputs side by side, y[M, sum of rows]."""
    m, k = x.shape
    count = len(mats)
    y = torch.empty(m, sum(mat.rows for mat in mats), dtype=torch.float32)
    rc = _lib.mistol_gemm_matrices(x.data_ptr(), m, k, count, (Matrix * count)(*mats), y.data_ptr(), y.shape[1],
                                   torch.get_num_threads(), _impl_id())
    if rc != 0:
        raise RuntimeError(f"mistol_gemm_matrices(M={m}, K={k}, N={[mat.rows for mat in mats]}): {_error(rc)}")
    return y


def dequantize_rows(fmt: str, blocks: torch.Tensor, k: int, dtype: torch.dtype,
                    out: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
    """Rows of llama.cpp blocks of a row-order format (Q4_K, Q5_K, Q6_K, Q4_1, Q5_0, Q5_1),
    uint8 [n, bytes per row] (CPU, contiguous), or the first `rows` rows of Q4_Kx8, Q5_Kx8 or
    Q6_Kx8 groups [groups, bytes per group] -> [n, k] float32 or bfloat16 (into `out`, if
    given: contiguous, of that shape and dtype)."""
    n = blocks.shape[0] if rows is None else rows
    if out is None:
        out = torch.empty(n, k, dtype=dtype)
    assert out.shape == (n, k) and out.dtype == dtype and out.is_contiguous() and blocks.is_contiguous()
    rc = _lib.mistol_dequantize_rows(_abi.formats[fmt], blocks.data_ptr(), n, k, out.data_ptr(), _dtype_id(dtype),
                                     torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"mistol_dequantize_rows({fmt}, K={k}): {_error(rc)}")
    return out


def gemm_requantized(fmt: str, blocks: torch.Tensor, rows: int, k: int, x: torch.Tensor) -> torch.Tensor:
    """x[M, k] (float32, contiguous) times the first `rows` rows of a layer on the int8 route:
    Q4_Kx8 / Q5_Kx8 / Q6_Kx8 groups requantized to int8 per 256 inputs group by group
    (csrc/requantize.c; AVX512-VNNI only), or Q4_1 / Q5_0 / Q5_1 rows converted 8 rows at a
    time to int8 blocks of their quants and scales for the int8 kernels (Q4_1's and Q5_1's
    block minimums added apart; csrc/quant_gemv.c): y[M, rows]."""
    m = x.shape[0]
    y = torch.empty(m, rows, dtype=torch.float32)
    if not fmt.endswith("x8"):  # (the legacy types, as the route sends them)
        rc = _lib.mistol_gemm_as_int8(_abi.formats[fmt], x.data_ptr(), m, k, blocks.data_ptr(), rows, y.data_ptr(),
                                      rows, torch.get_num_threads(), _impl_id())
    else:
        rc = _lib.mistol_gemm_requantized(_abi.formats[fmt], blocks.data_ptr(), rows, k, x.data_ptr(), m,
                                          y.data_ptr(), rows, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"gemm_requantized({fmt}, M={m}, K={k}): {_error(rc)}")
    return y


X8_GROUP_BYTES = {"Q4_K": 1184, "Q5_K": 1440, "Q6_K": 1680}  # bytes per 8-row group and 256 inputs (csrc/kquant.h)


def repack_x8(fmt: str, blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Q4_K, Q5_K or Q6_K rows uint8 [n, bytes per row] (CPU, contiguous) -> groups of 8 rows
    interleaved ("Q4_Kx8", ...), uint8 [ceil(n / 8), k / 256 * group bytes] (csrc/kquant.h)."""
    n = blocks.shape[0]
    out = torch.empty(-(-n // 8), k // 256 * X8_GROUP_BYTES[fmt], dtype=torch.uint8)
    repack = {"Q4_K": _lib.mistol_repack_q4_k_x8, "Q5_K": _lib.mistol_repack_q5_k_x8,
              "Q6_K": _lib.mistol_repack_q6_k_x8}[fmt]
    rc = repack(blocks.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"repacking {fmt} (K={k}): {_error(rc)}")
    return out


def _matrices(tensors: list[torch.Tensor], rows: list[int]) -> tuple[int, ctypes.Array, ctypes.Array]:
    """Several matrices as the C functions take them: count, their addresses, their rows."""
    count = len(tensors)
    return count, (ctypes.c_void_p * count)(*(t.data_ptr() for t in tensors)), (ctypes.c_int64 * count)(*rows)


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
    rc = _lib.mistol_dense_many(_dtype_id(weights[0].dtype), x.data_ptr(), int(x_is_bf16), m, k, count, ptrs, ns,
                                tiles, y.data_ptr(), y.shape[1], torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"mistol_dense_many(M={m}, K={k}, N={list(ns)}): {_error(rc)}")
    return y


def _dtype_id(dtype: torch.dtype) -> int:
    return _abi.dtypes[str(dtype).removeprefix("torch.")]


def dequantize(fmt: str, packed: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed groups in row order, untiled [G, K/32, bytes] (CPU, contiguous) -> rows [G * 8, K]
    in float32 or bfloat16 (into `out` if given: contiguous, of that shape and dtype)."""
    groups, nb, _ = packed.shape
    if out is None:
        out = torch.empty(groups * 8, nb * 32, dtype=dtype)
    assert out.shape == (groups * 8, nb * 32) and out.dtype == dtype and out.is_contiguous()
    assert dtype in (torch.float32, torch.bfloat16)
    rc = _lib.mistol_dequantize(_abi.formats[fmt], packed.data_ptr(), groups, nb * 32, out.data_ptr(),
                                _dtype_id(dtype), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"mistol_dequantize({fmt}, K={nb * 32}): {_error(rc)}")
    return out


def quantize(fmt: str, w: torch.Tensor, out: torch.Tensor, packed: bool) -> None:
    """Rows of w [n, K] -> llama.cpp Q8_0/Q4_0 blocks in `out`: in row order, or with
    `packed` in `mistol.quant`'s layout. w: CPU, contiguous, float32/bfloat16/float16."""
    n, k = w.shape
    rc = _lib.mistol_quantize(_abi.formats[fmt], w.data_ptr(), _dtype_id(w.dtype), n, k, out.data_ptr(),
                              int(packed), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"mistol_quantize({fmt}, K={k}): {_error(rc)}")


def pack_blocks(fmt: str, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """llama.cpp Q8_0/Q4_0 rows, uint8 [n, K/32, 34 | 18] (CPU, contiguous) -> `out`, the
    packed layout's groups in row order [ceil(n / 8), K/32, group bytes], as `quantize`
    writes them with `packed`."""
    n, nb, _ = blocks.shape
    rc = _lib.mistol_pack_blocks(_abi.formats[fmt], blocks.data_ptr(), n, nb * 32, out.data_ptr(),
                                 torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"mistol_pack_blocks({fmt}, K={nb * 32}): {_error(rc)}")


def matrix(fmt: str, packed: torch.Tensor, rows: int) -> Matrix:
    """A quantized matrix of `rows` rows as the C functions take it: int8/int4 packed in
    `mistol.quant`'s layout ([tiles, groups, blocks per tile, bytes]), or a row-order block
    format's rows ([rows, bytes per row], `mistol.block_quant`); the caller keeps `packed`
    alive."""
    tile_blocks = packed.shape[2] if packed.dim() == 4 else 1  # (row-order formats have no tiles)
    return Matrix(packed.data_ptr(), rows, tile_blocks, _abi.formats[fmt])


class DecodeWorkspace:
    """The decode layer's scratch buffers, kept from call to call (one per model: its calls
    must not overlap). They grow to the largest step seen and are freed with this object."""

    def __init__(self):
        self.handle = _lib.mistol_workspace_new()
        if not self.handle:
            raise MemoryError("mistol_workspace_new")
        self._free = weakref.finalize(self, _lib.mistol_workspace_free, self.handle)

    def close(self) -> None:
        self._free()


def decode_layer(workspace: DecodeWorkspace, args: DecodeArgs) -> None:
    """args.x (float32 [hidden], CPU) += decoder layer args.layer for one new token, with
    quantized weights: see csrc/mistol_abi.h for the fields of `args` (this call fills in
    the thread count and the implementation)."""
    args.nthreads, args.impl = torch.get_num_threads(), _impl_id()
    rc = _lib.mistol_decode_layer(workspace.handle, ctypes.byref(args))
    if rc != 0:
        raise RuntimeError(f"mistol_decode_layer(layer {args.layer}, hidden={args.hidden}, ffn={args.ffn}, "
                           f"heads={args.heads}/{args.kv_heads}x{args.head_dim}, slot {args.slot} of "
                           f"{args.capacity}, keys={args.n_keys}): {_error(rc)}")
