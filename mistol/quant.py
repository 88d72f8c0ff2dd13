"""Weight-only quantization of linear layers: int8 (llama.cpp Q8_0) and int4 (Q4_0).

Both formats cut each weight row into blocks of 32 inputs with one fp16 scale per block,
exactly as llama.cpp does (same rounding, same bytes):

- int8 = Q8_0: d = max|x| / 127, q = round(x / d) in -127..127; 34 bytes per block.
- int4 = Q4_0: d = m / -8 where m is the block's largest-magnitude value (signed),
  q = min(15, trunc(x / d + 8.5)) in 0..15, value d * (q - 8); byte j holds elements j
  (low nibble) and j + 16 (high nibble); 18 bytes per block.

`QuantizedLinear` keeps them repacked for the CPU kernels (`mistol.kernels`): rows in
groups of 8, the 8 rows' blocks of the same inputs side by side (scales first, then the
quants interleaved 4 bytes at a time, so that a 32-byte load holds 4 bytes of each row),
and rows longer than 4096 inputs cut into tiles along K (see `tile_blocks`):

    packed: uint8 [tiles, ceil(N/8), K/32/tiles, 16 + 8 * (32 | 16)]

Each row's quants are llama.cpp's bytes unchanged, so `QuantizedLinear.from_ggml` maps a
GGUF Q8_0/Q4_0 tensor onto this layout by moving bytes only (no dequantizing).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .errors import MistolError
from .model import backend

BLOCK = 32  # inputs per block (llama.cpp's QK8_0 / QK4_0)
INTERLEAVE = 8  # rows per group in the packed layout
# Most blocks of a row per tile: a tile's activations (4 KB) then stay in L1 while a decode
# step streams the tile's weights (see csrc/mistol_kernels.h).
TILE_BLOCKS = 128
_CHUNK_ELEMENTS = 1 << 21  # rows converted at a time while quantizing: bounds the temporaries


@dataclass(frozen=True)
class QuantFormat:
    name: str  # "int8" | "int4"
    ggml_type: str  # the GGUF tensor type it maps to
    quant_bytes: int  # bytes of quants per row and block

    @property
    def ggml_block_bytes(self) -> int:  # one row's block in llama.cpp: fp16 scale + quants
        return 2 + self.quant_bytes

    @property
    def group_block_bytes(self) -> int:  # one block of 8 interleaved rows in our layout
        return INTERLEAVE * self.ggml_block_bytes


FORMATS = {"int8": QuantFormat("int8", "Q8_0", 32), "int4": QuantFormat("int4", "Q4_0", 16)}
GGML_TYPES = {f.ggml_type: f.name for f in FORMATS.values()}  # llama.cpp's Q8_0 / Q4_0 -> int8 / int4


def _format(fmt: str) -> QuantFormat:
    if fmt not in FORMATS:
        raise MistolError(f"unknown quantization {fmt!r} (choose from {', '.join(FORMATS)})")
    return FORMATS[fmt]


def _check_k(k: int, what: str = "weight") -> None:
    if k <= 0 or k % BLOCK:
        raise MistolError(f"{what}: input size {k} is not a multiple of {BLOCK}, the int8/int4 block size")


def tile_blocks(k: int) -> int:
    """Blocks of 32 inputs per tile of the packed layout for rows of k inputs: all of them up
    to TILE_BLOCKS, else the largest equal tiles of at most TILE_BLOCKS blocks (14336 inputs:
    4 tiles of 112), or no tiles where that would make them shorter than 32 blocks."""
    blocks = k // BLOCK
    if blocks <= TILE_BLOCKS:
        return blocks
    for tiles in range(-(-blocks // TILE_BLOCKS), blocks // 32 + 1):
        if blocks % tiles == 0:
            return blocks // tiles
    return blocks


def packed_shape(out_features: int, in_features: int, fmt: str) -> tuple[int, int, int, int]:
    """The packed layout's shape: [tiles, groups of 8 rows, blocks per tile, bytes per block]."""
    per_tile = tile_blocks(in_features)
    return (in_features // BLOCK // per_tile, -(-out_features // INTERLEAVE), per_tile,
            _format(fmt).group_block_bytes)


def _to_tiles(groups: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Groups [G, K/32, bytes] in row order -> tiles [T, G, K/32/T, bytes] (into `out`, if given)."""
    g, nb, bb = groups.shape
    per_tile = tile_blocks(nb * BLOCK)
    tiled = groups.view(g, nb // per_tile, per_tile, bb).transpose(0, 1)
    if out is None:
        return tiled.contiguous()
    out.copy_(tiled)
    return out


def _from_tiles(packed: torch.Tensor) -> torch.Tensor:
    """Tiles [T, G, K/32/T, bytes] -> groups [G, K/32, bytes] in row order (a copy if T > 1)."""
    tiles, g, per_tile, bb = packed.shape
    return packed.transpose(0, 1).reshape(g, tiles * per_tile, bb)


# -- llama.cpp blocks ------------------------------------------------------------------------
def quantize_ggml(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Rows of w [n, K] -> llama.cpp Q8_0/Q4_0 blocks, uint8 [n, K/32, 34 | 18].

    Bit-exact with llama.cpp's reference quantizers (C kernels when built, else torch ops).
    """
    f = _format(fmt)
    n, k = w.shape
    _check_k(k)
    out = torch.empty(n, k // BLOCK, f.ggml_block_bytes, dtype=torch.uint8)
    if kernels.available():
        kernels.quantize(fmt, _kernel_source(w), out, packed=False)
        return out
    x = w.detach().to(device="cpu", dtype=torch.float32).contiguous().view(n, k // BLOCK, BLOCK)
    if fmt == "int8":
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        v = x * inv
        r = v.trunc()
        q = (r + torch.where((v - r).abs() >= 0.5, v.sign(), torch.zeros_like(v))).to(torch.int8)  # roundf
        out[..., 2:] = q.view(torch.uint8)
    else:
        m = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # first largest |x|, with its sign
        m = torch.where(m == 0, 0.0, m)  # +0.0 where all are zero, -0.0 included (llama.cpp's max = 0.0f)
        d = m / -8
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = (x * inv + 8.5).trunc().clamp(0, 15).to(torch.uint8)
        out[..., 2:] = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
    out[..., :2] = d.to(torch.float16).view(torch.uint8)
    return out


def dequantize_ggml(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """llama.cpp blocks [n, K/32, 34 | 18] -> float32 [n, K]."""
    n, nb, _ = blocks.shape
    d = blocks[..., :2].contiguous().view(torch.float16).float()
    qs = blocks[..., 2:]
    if fmt == "int8":
        q = qs.contiguous().view(torch.int8).float()
    else:
        q = torch.cat((qs & 15, qs >> 4), dim=-1).float() - 8
    return (q * d).reshape(n, nb * BLOCK)


def pack_ggml(blocks: torch.Tensor, fmt: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp blocks [n, B, 34 | 18] -> our layout, `packed_shape(n, 32 * B)` (into `out`,
    if given).

    Padding rows (n not a multiple of 8) are zero, which the kernels read as zero weights.
    """
    f = _format(fmt)
    n, nb, bb = blocks.shape
    if bb != f.ggml_block_bytes:
        raise MistolError(f"{f.ggml_type} blocks are {f.ggml_block_bytes} bytes, found {bb}")
    groups = -(-n // INTERLEAVE)
    if n % INTERLEAVE:
        blocks = torch.cat((blocks, blocks.new_zeros(groups * INTERLEAVE - n, nb, bb)))
    g = blocks.view(groups, INTERLEAVE, nb, bb).transpose(1, 2)  # [G, B, 8, bb]
    rows = torch.empty(groups, nb, f.group_block_bytes, dtype=torch.uint8)
    rows[..., : 2 * INTERLEAVE] = g[..., :2].reshape(groups, nb, 2 * INTERLEAVE)
    quants = g[..., 2:].reshape(groups, nb, INTERLEAVE, f.quant_bytes // 4, 4).transpose(2, 3)
    rows[..., 2 * INTERLEAVE :] = quants.reshape(groups, nb, INTERLEAVE * f.quant_bytes)
    return _to_tiles(rows, out)


def _row_quants(groups: torch.Tensor, quant_bytes: int) -> torch.Tensor:
    """Groups [G, B, bytes] (untiled) -> quants [G, B, 8, quant_bytes]: each row's bytes in
    llama.cpp's order."""
    n_groups, nb, _ = groups.shape
    quants = groups[..., 2 * INTERLEAVE :].reshape(n_groups, nb, quant_bytes // 4, INTERLEAVE, 4)
    return quants.transpose(2, 3).reshape(n_groups, nb, INTERLEAVE, quant_bytes)


def unpack_ggml(packed: torch.Tensor, n: int, fmt: str) -> torch.Tensor:
    """Our layout -> llama.cpp blocks [n, B, 34 | 18] (the inverse of `pack_ggml`)."""
    f = _format(fmt)
    packed = _from_tiles(packed)
    groups, nb, _ = packed.shape
    scales = packed[..., : 2 * INTERLEAVE].reshape(groups, nb, INTERLEAVE, 2)
    blocks = torch.cat((scales, _row_quants(packed, f.quant_bytes)), dim=-1).transpose(1, 2)  # [G, 8, B, bb]
    return blocks.reshape(groups * INTERLEAVE, nb, f.ggml_block_bytes)[:n]


def _dequantize_packed(
    packed: torch.Tensor, fmt: str, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Our layout (any device) -> [groups * 8, K] in `dtype`, padding rows included (written
    into `out`, if given, where the compiled kernels dequantize; else a new tensor)."""
    packed = _from_tiles(packed)
    if packed.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and kernels.available():
        return kernels.dequantize(fmt, packed, dtype, out)
    groups, nb, _ = packed.shape
    d = packed[..., : 2 * INTERLEAVE].contiguous().view(torch.float16).to(dtype)  # [G, B, 8]
    qs = _row_quants(packed, _format(fmt).quant_bytes)
    if fmt == "int8":
        q = qs.view(torch.int8).to(dtype)
    else:
        q = torch.cat((qs & 15, qs >> 4), dim=-1).to(dtype) - 8
    w = q * d[..., None]  # [G, B, 8, 32]
    return w.transpose(1, 2).reshape(groups * INTERLEAVE, nb * BLOCK)


# -- the module ------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """A bias-free `nn.Linear` whose weight is int8 (Q8_0) or int4 (Q4_0) in blocks of 32.

    The packed weight is a uint8 buffer, so `.to(device)`, `state_dict()` and memory
    accounting see it; `.to(dtype)` leaves it alone. On CPU the matmul runs on mistol's
    kernels (activations quantized to int8 per block of 32, fp32 accumulation; several rows,
    as a speculative verify pass or a prefill chunk has, read each weight block once for all
    of them, each row's result bit for bit what one row alone gets); elsewhere,
    or without the kernels, on PyTorch ops over the dequantized weight; prefill-sized inputs
    on a CPU with AMX tiles, as bf16 matmuls (`backend.quantized_route`).
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, packed: torch.Tensor):
        super().__init__()
        _check_k(in_features)
        want = packed_shape(out_features, in_features, fmt)
        if tuple(packed.shape) != want or packed.dtype != torch.uint8:
            raise MistolError(f"packed {fmt} weight: expected uint8 {list(want)}, found "
                              f"{packed.dtype} {list(packed.shape)}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.register_buffer("packed", packed.contiguous())

    @classmethod
    def from_ggml(cls, blocks, fmt: str, out_features: int, in_features: int) -> "QuantizedLinear":
        """A GGUF Q8_0 (fmt="int8") or Q4_0 ("int4") tensor of shape [out, in] (GGUF dims
        [in, out]) given as its raw bytes (a uint8 tensor, numpy array or buffer)."""
        f = _format(fmt)
        _check_k(in_features)
        nb = in_features // BLOCK
        if not isinstance(blocks, torch.Tensor):
            import warnings

            import numpy as np

            with warnings.catch_warnings():  # read-only (a mapped file): we only read it
                warnings.simplefilter("ignore", UserWarning)
                blocks = torch.from_numpy(np.frombuffer(blocks, dtype=np.uint8))
        size = out_features * nb * f.ggml_block_bytes
        if blocks.numel() * blocks.element_size() != size:
            raise MistolError(f"{f.ggml_type} tensor [{out_features}, {in_features}] takes {size} bytes, "
                              f"found {blocks.numel() * blocks.element_size()}")
        blocks = blocks.reshape(-1).view(torch.uint8).view(out_features, nb, f.ggml_block_bytes)
        packed = torch.empty(packed_shape(out_features, in_features, fmt), dtype=torch.uint8)
        step = _chunk_rows(in_features)
        fast = blocks.device.type == "cpu" and kernels.available()
        for r0 in range(0, out_features, step):
            chunk, dest = blocks[r0 : r0 + step], _groups_of(packed, r0, step)
            if fast:  # (torch's strided copies move ~1 GB/s; the kernel, memory's speed)
                _write_groups(dest, lambda groups: kernels.pack_blocks(fmt, chunk.contiguous(), groups))
            else:
                pack_ggml(chunk, fmt, out=dest)
        return cls(in_features, out_features, fmt, packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        route = backend.quantized_route(x2.shape[0], x2.device, self.fmt)
        if route == backend.QUANTIZED_KERNELS:
            y = kernels.gemm(self.fmt, kernel_input(x2), self.packed, self.out_features)
        else:
            y = self._matmul_dequantized(x2, torch.bfloat16 if route == backend.BF16_PREFILL else None)
        return output_like(y, x)

    def _matmul_dequantized(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        groups_per_slab = max(1, _CHUNK_ELEMENTS * 4 // (self.in_features * INTERLEAVE))

        def dequantize(r0, r1, dtype, out):
            return _dequantize_packed(self.packed[:, r0 // INTERLEAVE : r1 // INTERLEAVE], self.fmt, dtype, out=out)

        rows = self.packed.shape[1] * INTERLEAVE  # padding rows included
        y = matmul_dequantized(x, rows, self.in_features, groups_per_slab * INTERLEAVE, dequantize, dtype)
        return y[:, : self.out_features]

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [out_features, in_features] (the values the kernels use)."""
        return _dequantize_packed(self.packed, self.fmt, torch.float32)[: self.out_features]

    def weight_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (int64, CPU) of the weight as float32 [len(ids), in_features]: a tied
        head's rows are the token embedding's."""
        return rows_of_groups(ids, self.in_features,
                              lambda groups: _dequantize_packed(self.packed.index_select(1, groups), self.fmt, torch.float32))

    def to_ggml(self) -> torch.Tensor:
        """The weight as llama.cpp blocks, uint8 [out_features, in_features/32, 34 | 18]."""
        return unpack_ggml(self.packed.cpu(), self.out_features, self.fmt)

    @property
    def weight_nbytes(self) -> int:
        return self.packed.numel()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


_LOOKUP_GROUPS = 64  # groups dequantized at a time by `rows_of_groups` (bounds the temporary)


def rows_of_groups(ids: torch.Tensor, width: int, dequantize_groups: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Rows `ids` of a weight stored in groups of 8 rows, float32 [len(ids), width]:
    `dequantize_groups(group indices)` gives those groups' 8 rows each, [8 * n, width]."""

    def picked(part: torch.Tensor) -> torch.Tensor:
        groups = dequantize_groups(part // INTERLEAVE).view(part.numel(), INTERLEAVE, width)
        return groups[torch.arange(part.numel(), device=part.device), part % INTERLEAVE]

    if ids.numel() <= _LOOKUP_GROUPS:  # (a decode step's token: one call)
        return picked(ids)
    return torch.cat([picked(ids[i : i + _LOOKUP_GROUPS]) for i in range(0, ids.numel(), _LOOKUP_GROUPS)])


def kernel_input(x2: torch.Tensor) -> torch.Tensor:
    """Input rows [M, K] as the kernels take them: float32, contiguous."""
    if x2.dtype != torch.float32 or not x2.is_contiguous():  # (a decode step: skip no-op calls)
        x2 = x2.to(torch.float32).contiguous()
    return x2


_slab_scratch = threading.local()


def slab_scratch(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] CPU buffer for dequantized slabs, this thread's, kept between calls: a
    fresh one per call came from fresh pages (tens of MB of page faults per prefill: a 64-token
    prompt of a 0.5B model took 360 ms instead of 285, its first ones 570-760)."""
    nbytes = rows * cols * dtype.itemsize
    buf = getattr(_slab_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _slab_scratch.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes].view(dtype).view(rows, cols)


def matmul_dequantized(x: torch.Tensor, rows: int, in_features: int, slab_rows: int,
                       dequantize: Callable, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] times a quantized weight [rows, K] transposed, the weight dequantized a slab of
    `slab_rows` rows at a time by `dequantize(r0, r1, dtype, out)`: memory stays near the
    quantized size. dtype: float32 on a CPU (x's on a GPU) unless given."""
    if dtype is None:
        dtype = torch.float32 if x.device.type == "cpu" or not x.is_floating_point() else x.dtype
    x = x.to(dtype)
    y = torch.empty(x.shape[0], rows, dtype=dtype, device=x.device)
    # on a CPU one buffer for every slab (and every call, per thread)
    scratch = slab_scratch(min(slab_rows, rows), in_features, dtype) if x.device.type == "cpu" else None
    for r0 in range(0, rows, slab_rows):
        r1 = min(rows, r0 + slab_rows)
        w = dequantize(r0, r1, dtype, None if scratch is None else scratch[: r1 - r0])
        torch.matmul(x, w.to(x.device).T, out=y[:, r0:r1])
    return y


def output_like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Kernel output rows [M, N] back to x's leading shape and dtype."""
    y = y.view(x.shape[:-1] + (y.shape[-1],))
    return y if y.dtype == x.dtype else y.to(x.dtype)


def quantize_linear(
    weight: torch.Tensor | nn.Linear, fmt: str, name: str = "weight", release: Callable | None = None
) -> QuantizedLinear:
    """Quantize a linear layer's weight [out, in], of any float dtype.

    The weight is read a slab of rows at a time, so it is never copied whole; `release`,
    if given, is called on each slab once quantized (the loader passes `release_pages` to
    drop a memory-mapped checkpoint's pages as it goes). `name` is for error messages.
    """
    if isinstance(weight, nn.Linear):
        if weight.bias is not None:
            raise MistolError("quantize_linear: layers with a bias are not supported")
        weight = weight.weight
    n, k = weight.shape
    return quantize_rows(lambda r0, r1: weight[r0:r1], n, k, fmt, name=name, release=release)


def quantize_rows(
    read: Callable[[int, int], torch.Tensor], out_features: int, in_features: int, fmt: str,
    name: str = "weight", release: Callable | None = None,
) -> QuantizedLinear:
    """Quantize a weight [out_features, in_features] that `read(r0, r1)` hands out a slab
    of rows at a time (any float dtype), for weights that are not one tensor yet, such as
    another format's blocks dequantized slab by slab. `release` as in `quantize_linear`."""
    n, k = out_features, in_features
    _check_k(k, name)
    _format(fmt)
    packed = torch.empty(packed_shape(n, k, fmt), dtype=torch.uint8)
    step = _chunk_rows(k)
    fast = kernels.available()
    for r0 in range(0, n, step):
        rows = read(r0, min(n, r0 + step))
        dest = _groups_of(packed, r0, step)
        if fast:  # straight from the source dtype into the packed layout, in one pass
            _write_groups(dest, lambda groups: kernels.quantize(fmt, _kernel_source(rows), groups, packed=True))
        else:
            pack_ggml(quantize_ggml(rows, fmt), fmt, out=dest)
        if release is not None:
            release(rows)
    return QuantizedLinear(k, n, fmt, packed)


def quantize_tied_head(model: nn.Module) -> bool:
    """Give a quantized model with tied embeddings an int8 copy of its embedding as the
    output head (as llama.cpp runs such files): the head is the largest matrix of a small
    model (Qwen2.5-0.5B: 136M of its 494M weights), and read as float32 it would cost a
    decode step four times the bytes of the rest. The float embedding stays for the lookup.
    True when a head was made."""
    from .model.embedding import FloatRowsEmbedding
    from .weights.memory import release_pages

    stored = isinstance(model.embed_tokens, FloatRowsEmbedding)  # (rows of the mapped checkpoint)
    if getattr(model, "lm_head", True) is not None or not (stored or isinstance(model.embed_tokens, nn.Embedding)):
        return False  # (an embedding kept as a GGUF file's blocks is its own quantized head)
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        return False
    weight = model.embed_tokens.weight
    if weight.device.type != "cpu":
        return False
    n, k = weight.shape
    # the stored rows' pages given back once quantized: lookups read a few of them again
    model.lm_head = quantize_rows(lambda r0, r1: weight[r0:r1], n, k, "int8", name="lm_head (tied)",
                                  release=release_pages if stored else None)
    return True


def _kernel_source(w: torch.Tensor) -> torch.Tensor:
    w = w.detach()
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w = w.float()
    return w.cpu().contiguous()


def _chunk_rows(k: int) -> int:
    return max(INTERLEAVE, _CHUNK_ELEMENTS // k // INTERLEAVE * INTERLEAVE)


def _write_groups(dest: torch.Tensor, write: Callable[[torch.Tensor], None]) -> None:
    """Have `write(groups)` fill packed groups in row order [G, K/32, bytes] (as the kernels
    write them), laid into `dest`'s tiles: straight into `dest` when it has one tile."""
    tiles, n_groups, per_tile, bb = dest.shape
    groups = dest[0] if tiles == 1 else torch.empty(n_groups, tiles * per_tile, bb, dtype=torch.uint8)
    write(groups)
    if tiles > 1:
        _to_tiles(groups, out=dest)


def _groups_of(packed: torch.Tensor, row0: int, rows: int) -> torch.Tensor:
    """The packed groups (of every tile) holding rows [row0, row0 + rows) (row0 a multiple of 8)."""
    return packed[:, row0 // INTERLEAVE : -(-(row0 + rows) // INTERLEAVE)]
