"""Which code runs a model's steps: the plan, chosen once when an `Engine` gets its model.

`Backend.choose(model)` looks at the model (device, dtype, which linear layers are
quantized) and the machine (the C kernels, CUDA) and keeps what it found; sessions and
`Engine.decode_step` run every step through the plan. The `Transformer` is a plain
PyTorch model and knows nothing of the paths below. Changing a model's modules or moving
it after the engine made its plan needs a new plan (`Engine.replan`).

A forward step's decoder layers run on one of:

| path                 | runs when                                                  | code                         |
|----------------------|------------------------------------------------------------|------------------------------|
| CUDA graph replay    | one new token of one session on a CUDA device, graphs on   | `cuda_graphs.GraphedDecoder` |
|                      | (`MISTOL_CUDA_GRAPHS` is not "0")                          |                              |
| fused C decode layer | up to `FUSED_MAX_ROWS` new tokens of one session on a CPU  | `cpu_decode.CpuDecoder`      |
|                      | (a decode step, a verify pass, a short prompt), or the     | (`mistol_decode_layer`)      |
|                      | next token of each of as many sessions (a batch of decode  |                              |
|                      | steps), whose products all stay on the quantized kernels;  |                              |
|                      | every linear layer of every block quantized (int8/int4, or |                              |
|                      | GGUF blocks kept by `block_quant`, mixed freely); float32  |                              |
|                      | norms, attention biases, embeddings and caches; C kernels  |                              |
|                      | built, not switched to "torch"; no grad                    |                              |
| PyTorch layers       | everything else: longer prompts, larger batches, float     | `Transformer.forward`        |
|                      | weights, CUDA without graphs, training                     |                              |

Every path runs every model `ModelConfig` accepts: attention biases (Qwen2's q/k/v, Llama's
`attention_bias`) are added by the compiled layer and by the PyTorch layers (so also inside CUDA
graphs); a tied output head is the embedding matrix itself (floats, or GGUF blocks), multiplied after the layers on
any path (never a second copy of it).

Inside the PyTorch layers each linear product picks its kernel by its number of input
rows (`quantized_route`, `dense_kernel_runs`):

| path               | runs when                                                    | code                         |
|--------------------|--------------------------------------------------------------|------------------------------|
| quantized kernels  | a `QuantizedLinear` (or `BlockLinear`) on a CPU with the C   | `kernels.gemm_matrices`      |
|                    | kernels, fewer rows than `int8_prefill_rows(fmt)` and        |                              |
|                    | `bf16_prefill_rows(fmt)` (or none of those routes)           |                              |
| int8 prefill       | a repacked k-quant layer (Q4_Kx8, Q5_Kx8, Q6_Kx8) on a CPU   | `kernels.gemm_requantized`   |
|                    | with the AVX512-VNNI kernels, or a Q4_1/Q5_0/Q5_1 layer on   | (requantized to int8 per     |
|                    | AVX2 or AVX512-VNNI (beside AMX tiles: AVX512-VNNI, Q4_1,    | 256, 8 rows at a time; the   |
|                    | Q5_0, Q5_1, Q5_Kx8, Q6_Kx8; with AMX int8 tiles all three    | legacy types' quants as int8;|
|                    | k-quants, in tiles), `int8_prefill_rows(fmt)`+ rows, fewer   | AMX: the k-quants' products  |
|                    | than `bf16_prefill_rows(fmt)` where bf16 takes over          | in tiles)                    |
| bf16 prefill       | a quantized layer on a CPU with bf16 dot-product             | dequantize to bf16, matmul   |
|                    | instructions (`native_bf16`; int8/int4: AMX tiles),          |                              |
|                    | `bf16_prefill_rows(fmt)`+ rows                               |                              |
| dequantized matmul | a `QuantizedLinear` anywhere else (CUDA, no C kernels)       | dequantize by slabs, matmul  |
| dense kernel       | float weights (`Linear`, `TiledLinear`, a tied head) on a    | `kernels.dense_many`         |
|                    | CPU with the C kernels, at most `DENSE_MAX_ROWS` rows,       |                              |
|                    | f32/bf16/f16, no grad                                        |                              |
| PyTorch matmul     | float weights otherwise                                      | `F.linear`; `TiledLinear`:   |
|                    |                                                              | a batched matmul of tiles    |

Which float layers load as `TiledLinear` is decided by the loaders through `tiles_pay_off`
(model/linear.py); which load as `QuantizedLinear`, by `--quant` and `Engine.load`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import kernels
from ..util import cpu_flags
from .cpu_decode import CpuDecoder
from .cuda_graphs import GraphedDecoder
from .kv_cache import Q8_0, KVCache

DENSE_MAX_ROWS = 4  # rows of input up to which float weights use the dense kernel
# Up to this many new tokens of one session (a verify pass of speculative.MAX_DEPTH guesses,
# a chat turn's new message), or the next tokens of as many sessions (a server's batch of
# decode steps), run through the fused C layers together: each token gets the bits a decode
# step alone gives it, and the ~25 small PyTorch operations per layer (1.3-1.6 steps for a
# pass of one row at 0.5B) are gone. Their attention reads each chunk of the cache once for all
# the tokens and costs about what PyTorch's batched attention does per key (0.5B shape, int4,
# 2 threads, 8 rows over 512-8,000 keys: 1.08 against 1.14 us per row and key over its 24
# layers), so a pass stays fused at every context (scripts/bench_speculative.py --layers
# compiled,pytorch). A prompt of 18-48 tokens after 200 of context took 0.5B's layers 6-15%
# less time fused (65-131 ms against the PyTorch layers' 77-139; int4, 2 threads) and 7B's
# 0-7% less; from 64 on the two are even. Longer prompts, and products that a prefill route
# would take (_kernels_take), keep the PyTorch layers.
FUSED_MAX_ROWS = 48
# From this many rows (a prefill chunk) a bf16-capable CPU runs bf16 matmuls (`bf16_prefill_rows`).
# Each call first dequantizes the whole weight (in C, slab by slab), a fixed cost that pays off
# only over enough rows: these are the crossovers measured at 7B shapes on a 2-core AVX512-BF16
# machine. int8 and int4 have crossovers only where AMX tiles multiply bf16 (not measured here):
# since their several-row kernels keep each row pair's sums in registers they outrun
# dequantize + bf16 matmul on AVX512-BF16 at every length measured (64-512 rows: 1.0-1.8x).
BF16_MIN_ROWS = {"int8": 112, "int4": 144}
KERNELS_OUTRUN_BF16 = frozenset(("int8", "int4"))  # (without AMX)
# llama.cpp's block types kept as the file holds them (mistol.block_quant): their row-by-row
# kernels spend 1.5-4x the int4 kernel's time per weight (scales per block or sub-block), and
# their dequantization runs at 1-3 G weights/s a core, so bf16 slabs win from about 32 rows
# (Q5_0/Q4_1 at 1b's widths: 32-48 rows, scripts/bench_prefill_route.py; at 0.5b's narrower
# ones that script says 64-80, but whole 64-token prompts ran at half the speed with 96 here;
# on AVX2 and AVX512-VNNI the int8 route below takes them from 32 rows, faster still);
# repacked Q4_K, Q5_K and Q6_K (Q4_Kx8, Q5_Kx8, Q6_Kx8), whose kernels take 8 rows at once,
# from about 512, 320 and 192 (a 2-core AVX512-BF16 EPYC, 1 and 2 threads, 7B's FFN and
# attention shapes, kernels against dequantize + bf16 matmul in turns: at 160 rows the kernels
# took 0.75-0.98 of bf16's time for all three; at 320, Q4_K 0.85-0.94, Q5_K 1.0-1.03, Q6_K 1.16-1.18).
BF16_MIN_ROWS.update(dict.fromkeys(("Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q5_0", "Q5_1"), 32), Q4_Kx8=512, Q5_Kx8=320,
                     Q6_Kx8=192)

# From this many rows the repacked k-quants are requantized to int8 per 256 inputs, 8 rows at
# a time, for an int8 product with all the rows (`int8_prefill_rows`, csrc/requantize.c), on
# CPUs with AVX512-VNNI: the k-quants' own kernels unpack their bits again for every 8 rows and
# scale every 16-32 inputs, bf16 matmuls take twice the instructions per product. 2-core
# AVX512-BF16 EPYC, 7B's FFN shapes, routes in turns, over the types' own kernels, 1 and 2
# threads: at 32 rows 1.01-1.14x the time, at 48 0.85-0.95, at 64 0.75-0.88, at 512 0.48-0.63
# (and 0.57-0.63 of bf16 slabs', 2 threads).
# Q6_K's several-row kernels, since unpacked as its one-row kernel (csrc/kquant_gemv.c), are
# 1.3x faster: over them the int8 route takes at 32 rows 1.21-1.26x the time, at 48 0.97-0.99,
# at 64 0.86-0.91, at 128 0.63-0.65 (a 7B Q6_K file's first block, 1 and 2 threads).
# The legacy types go to the int8 kernels without requantizing: 8 rows at a time, their
# quants and scales become int8 blocks as they are (Q5_0's values d * (q - 16) exactly; Q4_1's
# and Q5_1's d * q + m less the minimum m, whose share is added in float). Q5_0 and Q5_1 are
# what llama.cpp's Q4_K_M and Q5_K_M fall back to where a width is no multiple of 256: most
# of a Qwen2.5-0.5B or SmolLM file. Layers alone, 2 threads, over the types' own kernels:
# Q5_0 (0.5b's widths) 2 rows 0.73x the time, 16 0.24, 64 0.19 (bf16 slabs 0.48), 512 0.17
# (bf16 0.33); Q5_1 (0.5b) 16-512 rows 0.21-0.32 (bf16 0.31-1.5); Q4_1 (1b) 32-512 rows
# 0.23-0.28 (bf16 0.28-0.77); with the AVX2 kernels 0.28-0.44 from 16 rows. From 32 rows only:
# a verify pass (at most speculative.MAX_DEPTH + 1 = 17 rows) and a batch of decode steps keep
# the bits the types' kernels give one row, which a decode step alone gets. Those take the
# types' several-row kernels, which unpack each weight row once for up to 16 rows: at 7B's
# widths, 2 threads, 8 rows cost 2.7-4.1x one row with AVX512-VNNI, 3.2-4.8x with AVX2 (row by
# row: 5.9-7.9x); 16 rows 4.7-7.0x and 5.3-8.8x (scripts/bench_gemm_rows.py --blocks Q5_0,...).
INT8_MIN_ROWS = {"avx512vnni": {**dict.fromkeys(("Q4_Kx8", "Q5_Kx8"), 48), "Q6_Kx8": 64,
                                **dict.fromkeys(("Q4_1", "Q5_0", "Q5_1"), 32)},
                 "avx2": dict.fromkeys(("Q4_1", "Q5_0", "Q5_1"), 32)}
# Beside AMX tiles a bf16 product is cheap enough to take over at 128-256 rows, and the int8
# route (AVX512-VNNI) pays below that. A 2-core AMX Xeon in a VM, scripts/bench_prefill_route.py
# over 0.5b and 1b files of llama.cpp's Q4_K_M and Q5_K_M, 2 threads, routes in turns, each
# route's time over the types' own kernels' (int8 / bf16): Q5_0 0.58 / 1.81 at 32 rows, 0.42 /
# 0.98 at 64, 0.44 / 0.54-0.56 at 128, 0.41 / 0.37 at 256, 0.35-0.43 / 0.23-0.32 at 512;
# Q6_Kx8 0.84-0.86 / 1.23-1.31 at 64, 0.66-0.72 / 0.75-0.84 at 128, 0.55-0.59 / 0.49-0.59 at
# 256, 0.54-0.56 / 0.35-0.36 at 512; Q5_Kx8 0.88 / 1.62 at 64, 0.69 / 0.59 at 128; Q4_Kx8
# 1.04 / 1.39 at 64, 0.81 / 0.77 at 128, 0.62 / 0.39 at 512. (Q4_1 and Q5_1 take Q5_0's, whose
# route they share.) int8 and int4 keep BF16_MIN_ROWS: their layers alone put bf16's crossover
# at 192-450 rows (1b and 0.5b widths), but a whole random 1b int8 model's 192-token prompt ran
# at 172 tok/s on the kernels against 231 with bf16 (`mistol bench --shape 1b --quant int8,int4
# --engines mistol --prompts 128,192`), and 128 tokens gained 3% (int4 4%).
AMX_INT8_MIN_ROWS = {**dict.fromkeys(("Q4_1", "Q5_0", "Q5_1"), 32), "Q5_Kx8": 64, "Q6_Kx8": 64}
AMX_BF16_MIN_ROWS = {**dict.fromkeys(("Q4_1", "Q5_0", "Q5_1", "Q6_Kx8"), 256), "Q4_Kx8": 128, "Q5_Kx8": 128}
# Where the process may use AMX's int8 tiles (`kernels.int8_tiles`), the int8 route multiplies
# the requantized k-quants in them, two groups of 8 rows by 16 activation rows a tile, and
# what is left is mostly the requantization, paid once per 8 weight rows: it then outruns the
# k-quants' own kernels from 24-32 rows and bf16 slabs at every length. A 2-core AMX Xeon in a
# VM, scripts/bench_prefill_route.py over llama.cpp's 7B Q4_K_M and Q5_K_M files' first block,
# 2 threads, routes in turns, time over the kernels' (int8 / bf16): Q4_Kx8 1.45 / 3.81 at 16
# rows, 1.04 / 2.70 at 24, 0.84 / 2.22 at 32, 0.55 / 1.45 at 64, 0.28 / 0.47 at 512; Q5_Kx8
# 1.26 / 3.07 at 16, 0.95 / 2.26 at 24, 0.53 / 1.16 at 64, 0.23 / 0.26 at 512; Q6_Kx8
# 1.17-1.24 / 3.83-3.89 at 16, 0.89-0.92 / 2.74-2.85 at 24, 0.48-0.50 / 1.15-1.21 at 64,
# 0.22-0.23 / 0.23-0.29 at 512.
TILES_INT8_MIN_ROWS = {"Q4_Kx8": 32, "Q5_Kx8": 24, "Q6_Kx8": 24}

QUANTIZED_KERNELS, BF16_PREFILL, INT8_PREFILL, DEQUANTIZED = "kernels", "bf16", "int8", "dequantized"


@dataclass
class Backend:
    """The plan of one model's steps (see the module's table)."""

    device: torch.device
    cpu_decoder: CpuDecoder | None = None  # the fused C layers, when the model fits them
    cuda_graphs: bool = False  # single-token steps replay CUDA graphs (on a CUDA device)

    @classmethod
    def choose(cls, model: torch.nn.Module, cuda_graphs: bool | None = None) -> "Backend":
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("MISTOL_CUDA_GRAPHS", "1") != "0"
        device = model.device
        fused = device.type == "cpu" and model.dtype == torch.float32
        return cls(device, CpuDecoder.of(model) if fused else None, cuda_graphs)

    @property
    def graphs(self) -> bool:
        """Whether single-token steps of one session replay CUDA graphs."""
        return self.cuda_graphs and self.device.type == "cuda"

    def graphed_decoder(self, model: torch.nn.Module, cache: KVCache) -> GraphedDecoder:
        return GraphedDecoder(model, cache)

    def forward(self, model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                caches: Sequence[KVCache], all_logits: bool = False) -> torch.Tensor:
        """`model(tokens, positions, caches, all_logits)`, on the fused C layers where they apply."""
        if self._fused_fits(model, tokens, caches):
            x, cos, sin = model.embed(tokens, positions)
            if len(caches) > 1:  # the next token of each of several sequences
                plans = [cache.plan(pos.reshape(-1)) for cache, pos in zip(caches, positions)]
                return model.logits(self.cpu_decoder.run_sessions(x, cos, sin, list(caches), plans), all_logits)
            plan = caches[0].plan(positions.reshape(-1))
            return model.logits(self.cpu_decoder.run(x, cos, sin, caches[0], plan), all_logits)
        return model(tokens, positions, caches, all_logits=all_logits)

    def _kernels_take(self, rows: int) -> bool:
        """Whether the PyTorch layers too would multiply `rows` rows of every matrix on the
        quantized kernels (the fused layer's products), not on a prefill route."""
        return all(quantized_route(rows, self.device, fmt) == QUANTIZED_KERNELS for fmt in self.cpu_decoder.formats)

    def _fused_fits(self, model: torch.nn.Module, tokens: torch.Tensor, caches: Sequence[KVCache]) -> bool:
        """Whether the fused layers take this step: tokens [1, L] of one sequence, or [B, 1],
        the next token of each of B sequences, at most FUSED_MAX_ROWS rows either way."""
        if self.cpu_decoder is None or tokens.dim() != 2 or tokens.shape[0] != len(caches):
            return False
        rows = tokens.numel()
        if (len(caches) > 1 and tokens.shape[1] != 1) or not 1 <= rows <= FUSED_MAX_ROWS:
            return False
        if rows > 1 and not self._kernels_take(rows):
            return False
        return (
            all(self._cache_fits(cache, caches[0].dtype) for cache in caches)
            and not (torch.is_grad_enabled() and any(p.requires_grad for p in model.embed_tokens.parameters()))
            and kernels.impl_name() != "torch"
        )

    @staticmethod
    def _cache_fits(cache: KVCache, dtype) -> bool:
        return (
            cache.dtype == dtype
            and dtype in (torch.float32, torch.float16, Q8_0)
            and cache.k.device.type == "cpu"
            and cache.k.shape[1] == 1  # a cache of one sequence
            and all(t.is_contiguous() for t in cache.tensors().values())
        )


# -- linear products ---------------------------------------------------------------------------
def _forced_bf16() -> bool | None:
    forced = os.environ.get("MISTOL_BF16_PREFILL")
    return forced == "1" if forced in ("0", "1") else None


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16
    matrix products can outrun our kernels (`bf16_prefill_rows`); MISTOL_BF16_PREFILL=0/1
    overrides."""
    forced = _forced_bf16()
    return forced if forced is not None else bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@functools.cache
def bf16_tiles() -> bool:
    """Whether this CPU multiplies bf16 in AMX tiles; MISTOL_BF16_PREFILL=0/1 overrides."""
    forced = _forced_bf16()
    return forced if forced is not None else "amx_bf16" in cpu_flags()


def bf16_prefill_rows(fmt: str) -> int | None:
    """From how many input rows a quantized layer of format `fmt` multiplies dequantized bf16
    weights on this CPU; None: never (its kernels at every length)."""
    if not native_bf16() or (fmt in KERNELS_OUTRUN_BF16 and not bf16_tiles()):
        return None
    if bf16_tiles():  # (from where bf16 takes over from the int8 route)
        if _int8_route_in_tiles(fmt):
            return None  # (the int8 route in tiles outruns it at every length)
        return AMX_BF16_MIN_ROWS.get(fmt, BF16_MIN_ROWS[fmt])
    # without tiles a format's int8 route, where it has one, outruns bf16 at every length
    return BF16_MIN_ROWS[fmt] if int8_prefill_rows(fmt) is None else None


def _int8_route_in_tiles(fmt: str) -> bool:
    """Whether a layer of format `fmt` would take the int8 route in AMX int8 tiles."""
    return (fmt in TILES_INT8_MIN_ROWS and os.environ.get("MISTOL_INT8_PREFILL") != "0"
            and kernels.impl_name() == "avx512vnni" and kernels.int8_tiles())


def int8_prefill_rows(fmt: str) -> int | None:
    """From how many input rows a quantized layer of format `fmt` is requantized to int8 for
    an int8 product on this CPU; None: never (MISTOL_INT8_PREFILL=0: never, to compare)."""
    if os.environ.get("MISTOL_INT8_PREFILL") == "0":
        return None
    if _int8_route_in_tiles(fmt):
        return TILES_INT8_MIN_ROWS[fmt]
    if bf16_tiles():  # (up to where bf16 takes over: AMX_BF16_MIN_ROWS)
        return AMX_INT8_MIN_ROWS.get(fmt) if kernels.impl_name() == "avx512vnni" else None
    return INT8_MIN_ROWS.get(kernels.impl_name(), {}).get(fmt)


def quantized_route(rows: int, device: torch.device, fmt: str) -> str:
    """How a quantized layer multiplies `rows` input rows on `device`: QUANTIZED_KERNELS,
    INT8_PREFILL, BF16_PREFILL or DEQUANTIZED."""
    if device.type != "cpu":
        return DEQUANTIZED
    bf16_rows = bf16_prefill_rows(fmt)
    if bf16_rows is not None and rows >= bf16_rows:
        # Prefill is compute-bound, and there a CPU's bf16 dot products (or tiles) multiply
        # faster than our kernels (and a little more exactly).
        return BF16_PREFILL
    int8_rows = int8_prefill_rows(fmt)
    if int8_rows is not None and rows >= int8_rows:
        return INT8_PREFILL
    return QUANTIZED_KERNELS if kernels.available() else DEQUANTIZED


def dense_kernel_runs(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether x times these float weights (of one dtype) runs on the dense C kernel."""
    dtype = weights[0].dtype
    return (
        x.device.type == "cpu"
        and x.numel() <= DENSE_MAX_ROWS * x.shape[-1]
        and dtype in kernels.DENSE_DTYPES
        and all(w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous() for w in weights)
        and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
        and kernels.available()
    )
