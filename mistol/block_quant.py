"""Linear layers that keep a GGUF tensor's llama.cpp blocks as the file holds them: the
k-quants Q4_K, Q5_K, Q6_K (a Q4_K_M file mixes Q4_K and Q6_K) and the legacy Q4_1,
Q5_0, Q5_1 (block layouts: csrc/kquant.h).

Each row is its blocks one after another, in the file's order, so loading costs nothing:
the weight is a view of the mapped file (a copy only for q/k rows that llama.cpp's
converter reordered), and memory stays the file's size. Q4_K, Q5_K and Q6_K (the types of
the Q4_K_M and Q5_K_M files) are repacked at load (`BlockLinear.for_kernels`): 8 rows'
super-blocks side by side ("Q4_Kx8", "Q5_Kx8", "Q6_Kx8", csrc/kquant.h), which the kernels
multiply 8 rows at a time, about twice as fast as row by row; it costs one pass over the
tensor (a copy that replaces the mapped pages: memory stays near the file's size, +2.8% for
Q4_K, +2.3% for Q5_K, +0 for Q6_K). Decode steps multiply on the C
kernels (csrc/kquant_gemv.c: activations quantized to int8 per 256 inputs for the
k-quants, per 32 for the legacy types, integer dot products per block). Prefill-sized
inputs never see a converted copy of a whole matrix: on CPUs with AVX512-VNNI the
repacked k-quants are requantized to int8 8 rows at a time, each piece multiplied by all
the prompt's rows while it sits in the cache (csrc/requantize.c); the legacy types, on
AVX2 and AVX512-VNNI, become int8 blocks of their own quants 8 rows at a time for the int8
kernels (Q4_1's and Q5_1's block minimums added apart; csrc/quant_gemv.c); elsewhere a slab
of rows at a time is dequantized for PyTorch's matmul (bf16 where the CPU has bf16 dot
products). `backend.quantized_route` picks by the number of rows.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .errors import MistolError
from .model import backend
from .quant import (BLOCK, FORMATS, GGML_TYPES, INTERLEAVE, QuantizedLinear, dequantize_ggml, kernel_input,
                    matmul_dequantized, output_like, rows_of_groups)

# inputs per block, bytes per block
ROW_FORMATS = {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
               "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24)}
# where each block holds its fp16 scales (d, and dmin / m where it has one), byte offsets
SCALE_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2)}
KERNEL_LAYOUTS = {"Q4_Kx8": "Q4_K", "Q5_Kx8": "Q5_K", "Q6_Kx8": "Q6_K"}  # layouts made at load, and their GGUF types
INT8_ROUTE_FORMATS = frozenset((*KERNEL_LAYOUTS, "Q4_1", "Q5_0", "Q5_1"))  # what kernels.gemm_requantized multiplies
# a token embedding keeps these as blocks: the row formats, and the int8 / int4 kernels' own (Q8_0, Q4_0)
EMBEDDING_FORMATS = (*ROW_FORMATS, *GGML_TYPES)
_SLAB_VALUES = 1 << 22  # weights dequantized at a time on the prefill path


def row_bytes(fmt: str, in_features: int) -> int:
    block, nbytes = ROW_FORMATS[fmt]
    return in_features // block * nbytes


class BlockLinear(nn.Module):
    """A bias-free linear layer whose weight [out_features, in_features] is llama.cpp blocks
    of type `fmt` (a key of ROW_FORMATS), uint8 [out_features, bytes per row] in `packed`;
    or, for fmt "Q4_Kx8", "Q5_Kx8" or "Q6_Kx8", that GGUF type repacked in groups of 8 rows,
    uint8 [groups, bytes per group].
    `file_type` is the GGUF type either way."""

    def __init__(self, in_features: int, out_features: int, fmt: str, packed: torch.Tensor):
        super().__init__()
        if fmt not in ROW_FORMATS and fmt not in KERNEL_LAYOUTS:
            raise MistolError(f"unknown block type {fmt!r} (choose from {', '.join(ROW_FORMATS)})")
        self.file_type = KERNEL_LAYOUTS.get(fmt, fmt)
        block = ROW_FORMATS[self.file_type][0]
        if in_features <= 0 or in_features % block:
            raise MistolError(f"{fmt} weight: input size {in_features} is not a multiple of {block}")
        if fmt in KERNEL_LAYOUTS:
            want = (-(-out_features // 8), in_features // 256 * kernels.X8_GROUP_BYTES[self.file_type])
        else:
            want = (out_features, row_bytes(fmt, in_features))
        if tuple(packed.shape) != want or packed.dtype != torch.uint8:
            raise MistolError(f"{fmt} weight: expected uint8 {list(want)}, found {packed.dtype} {list(packed.shape)}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.register_buffer("packed", packed if packed.is_contiguous() else packed.contiguous())

    @classmethod
    def for_kernels(cls, in_features: int, out_features: int, fmt: str, rows: torch.Tensor) -> "BlockLinear":
        """The layer in the layout the CPU kernels run fastest: Q4_K, Q5_K and Q6_K repacked
        to Q4_Kx8 / Q5_Kx8 / Q6_Kx8 where the compiled kernels run, every other type (and
        those elsewhere) as it is."""
        if fmt in kernels.X8_GROUP_BYTES and rows.device.type == "cpu" and kernels.available():
            cls(in_features, out_features, fmt, rows)  # (checks the shape)
            return cls(in_features, out_features, fmt + "x8", kernels.repack_x8(fmt, rows.contiguous(), in_features))
        return cls(in_features, out_features, fmt, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        route = backend.quantized_route(x2.shape[0], x2.device, self.fmt)
        if route == backend.QUANTIZED_KERNELS:
            y = kernels.gemm_matrices(kernel_input(x2), [kernels.matrix(self.fmt, self.packed, self.out_features)])
        elif route == backend.INT8_PREFILL:
            y = kernels.gemm_requantized(self.fmt, self.packed, self.out_features, self.in_features, kernel_input(x2))
        else:
            y = self._matmul_dequantized(x2, torch.bfloat16 if route == backend.BF16_PREFILL else None)
        return output_like(y, x)

    def _matmul_dequantized(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        slab_rows = max(8, _SLAB_VALUES // self.in_features // 8 * 8)  # (whole groups of Q4_Kx8)
        return matmul_dequantized(x, self.out_features, self.in_features, slab_rows, self._dequantize, dtype)

    def _dequantize(self, r0: int, r1: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.fmt in KERNEL_LAYOUTS:  # (made only where the library loaded; r0 a multiple of 8)
            groups = self.packed[r0 // 8 : -(-r1 // 8)]
            if dtype in (torch.float32, torch.bfloat16):
                return kernels.dequantize_rows(self.fmt, groups, self.in_features, dtype, out, rows=r1 - r0)
            return kernels.dequantize_rows(self.fmt, groups, self.in_features, torch.float32, rows=r1 - r0).to(dtype)
        rows = self.packed[r0:r1]
        if rows.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and kernels.available():
            return kernels.dequantize_rows(self.fmt, rows, self.in_features, dtype, out)
        from .weights.gguf_package import gguf

        values = gguf.quants.dequantize(rows.cpu().numpy(), gguf.GGMLQuantizationType[self.fmt])
        return torch.from_numpy(values).to(device=rows.device, dtype=dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [out_features, in_features]."""
        return self._dequantize(0, self.out_features, torch.float32)

    def weight_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (int64, CPU) of the weight as float32 [len(ids), in_features]: a tied
        head's rows are the token embedding's."""
        if self.fmt not in KERNEL_LAYOUTS:
            return BlockLinear(self.in_features, ids.numel(), self.fmt, self.packed[ids]).dequantize()

        def dequantize_groups(groups: torch.Tensor) -> torch.Tensor:
            return kernels.dequantize_rows(self.fmt, self.packed.index_select(0, groups), self.in_features,
                                           torch.float32, rows=INTERLEAVE * groups.numel())

        return rows_of_groups(ids, self.in_features, dequantize_groups)

    @property
    def weight_nbytes(self) -> int:
        return self.packed.numel()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


class BlockEmbedding(nn.Module):
    """A token embedding kept as a GGUF tensor's blocks (uint8 [vocab, bytes per row] in
    `packed`: one of ROW_FORMATS, or llama.cpp's Q8_0 / Q4_0): a token's row is dequantized
    when it is looked up, to `dtype`. A float32 copy would take 0.5 GB at 7B (an eighth of
    a Q4_K_M file) and 0.5 GB at Qwen2.5-0.5B (more than its whole Q4_K_M file); as blocks
    it takes its share of the file, and only the rows looked up are ever read.

    A tied output head multiplies the same values (`as_linear`), on the layout the kernels
    run fastest, made once from the file's bytes with nothing requantized: Q8_0 / Q4_0 as the
    int8 / int4 kernels' packed layout (`QuantizedLinear.from_ggml`), Q4_K / Q5_K / Q6_K
    repacked 8 rows at a time (`BlockLinear.for_kernels`), the other types as they are. It
    is made at load for a tied model (`tied`), else when first asked for. Where it is a copy,
    tokens are looked up in it (their groups of 8 rows dequantized), so the file's pages are
    given back at load and never read again: a 0.5B model's 137 MB Q8_0 embedding is then held
    once, not once in the head and once more, piece by piece, in the pages that lookups read."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str, packed: torch.Tensor,
                 dtype: torch.dtype = torch.float32, tied: bool = False):
        super().__init__()
        if fmt not in EMBEDDING_FORMATS:
            raise MistolError(f"unknown block type {fmt!r} (choose from {', '.join(EMBEDDING_FORMATS)})")
        if fmt in ROW_FORMATS:
            self.rows = BlockLinear(embedding_dim, num_embeddings, fmt, packed)
        else:  # Q8_0 / Q4_0: rows of llama.cpp's 32-input blocks
            ggml_bytes = embedding_dim // BLOCK * FORMATS[GGML_TYPES[fmt]].ggml_block_bytes
            if embedding_dim % BLOCK or tuple(packed.shape) != (num_embeddings, ggml_bytes) or packed.dtype != torch.uint8:
                raise MistolError(f"{fmt} embedding: expected uint8 [{num_embeddings}, {ggml_bytes}] and a "
                                  f"width that is a multiple of {BLOCK}, found {packed.dtype} {list(packed.shape)}")
            self.rows = None
            self.register_buffer("packed", packed)
        self.num_embeddings, self.embedding_dim, self.fmt, self.dtype = num_embeddings, embedding_dim, fmt, dtype
        self.head = self._make_head(packed) if tied else None

    @property
    def device(self) -> torch.device:
        return (self.packed if self.rows is None else self.rows.packed).device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(-1).to(self.device)
        if ((ids < 0) | (ids >= self.num_embeddings)).any():
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        if self.head_is_a_copy:  # (the file's rows are then never read again: no pages of them held)
            values = self.head.weight_rows(ids)
        elif self.rows is None:
            picked = self.packed[ids].view(ids.numel(), self.embedding_dim // BLOCK, -1)
            values = dequantize_ggml(picked, GGML_TYPES[self.fmt])
        else:
            values = self.rows.weight_rows(ids)
        return values.to(self.dtype).view(*tokens.shape, self.embedding_dim)

    def as_linear(self) -> nn.Module:
        """The blocks as a linear layer [vocab, hidden] (a tied head)."""
        if self.head is None:
            self.head = self._make_head(self.packed if self.rows is None else self.rows.packed)
        return self.head

    def _make_head(self, packed: torch.Tensor) -> nn.Module:
        if self.rows is None:
            return QuantizedLinear.from_ggml(packed, GGML_TYPES[self.fmt], self.num_embeddings, self.embedding_dim)
        head = BlockLinear.for_kernels(self.embedding_dim, self.num_embeddings, self.fmt, packed)
        return head if head.fmt != self.fmt else self.rows  # (repacked, or the rows themselves)

    @property
    def head_is_a_copy(self) -> bool:
        """Whether a head was made that holds the values a second time: the lookups then read
        the head's rows, not the file's, and the loader gives the file's pages back."""
        return self.head is not None and self.head is not self.rows

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}"
