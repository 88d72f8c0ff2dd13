"""What M activation rows cost against one, in one quantized matrix product at 7B shapes.

    python scripts/bench_gemm_rows.py [--impl auto|avx512vnni|avx2|scalar] [--threads 1] [--rounds 8]
                                      [--rows 1,2,4,8,16] [--blocks Q4_K,Q5_K,Q6_K]

`--blocks` adds llama.cpp's block types as a GGUF file's rows load (random quants; Q4_K,
Q5_K and Q6_K repacked 8 rows at a time), through their own kernels at every row count (a
prompt chunk of 32-64 rows or more takes the int8 route instead: mistol/model/backend.py).

A speculative verify pass (k guesses: k + 1 rows) or a prefill chunk multiplies several rows
by the same weights; a one-row product (a decode step) is bound by reading the weights from
memory, so the extra rows should cost only their arithmetic. Each method cycles through
enough copies of the weights (>= 256 MB) that they come from memory. With one thread
(the default) the time is the calling thread's CPU time, which other processes on a shared
machine disturb less than the wall clock; the best call of every round is kept, and the
rounds take turns over the row counts. Prints each row count's time as a multiple of one
row's, and in ms. (Prompts of 112+ rows go to bf16 matmuls only on CPUs with AMX tiles; this
times the kernels at any --rows.)
"""

from __future__ import annotations

import argparse
import time

import torch

from mistol import kernels
from mistol.bench.models import random_block_rows
from mistol.block_quant import ROW_FORMATS, BlockLinear
from mistol.errors import run_script
from mistol.quant import QuantizedLinear, quantize_linear

SHAPES = [(14336, 4096), (4096, 14336)]  # [out, in]: gate/up and down of Mistral 7B
MIN_WORKING_SET = 256 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="auto", choices=["auto", "avx512vnni", "avx2", "dotprod", "neon", "scalar"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--rows", default="1,2,4,8,16", help="row counts, comma-separated (1 is always timed)")
    ap.add_argument("--blocks", default="", help="llama.cpp block types too, comma-separated (e.g. Q4_K,Q6_K)")
    args = ap.parse_args()
    blocks = [b for b in args.blocks.split(",") if b]
    unknown = [b for b in blocks if b not in ROW_FORMATS]
    if unknown:
        ap.error(f"--blocks: of {', '.join(ROW_FORMATS)}; not {', '.join(unknown)}")
    try:
        rows = sorted({1} | {int(m) for m in args.rows.split(",") if m.strip()})
    except ValueError:
        ap.error(f"--rows: comma-separated row counts, not {args.rows!r}")
    if rows[0] < 1:
        ap.error("--rows: each count must be at least 1")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    torch.manual_seed(0)
    with kernels.use(args.impl):
        print(f"{args.threads} thread(s), mistol kernels: {kernels.impl_name()}")
    for fmt in ("int8", "int4", *blocks):
        for n, k in SHAPES:
            layer = make_layer(fmt, n, k)
            copies = [layer] + [make_layer(fmt, n, k) for _ in range(max(1, -(-MIN_WORKING_SET // layer.packed.numel()) - 1))]
            products = [product(copy, n) for copy in copies]
            xs = {m: torch.randn(m, k) for m in rows}
            best = {m: float("inf") for m in rows}
            with kernels.use(args.impl):
                for _ in range(args.rounds):
                    for m in rows:
                        for multiply in products:
                            start = clock()
                            multiply(xs[m])
                            best[m] = min(best[m], clock() - start)
            one = best[1]
            print(f"{fmt} [{n} x {k}]: 1 row {one * 1e3:.2f} ms ({layer.packed.numel() / one / 1e9:.1f} GB/s); "
                  + "  ".join(f"{m} rows {best[m] / one:.2f}x ({best[m] * 1e3:.1f} ms)" for m in rows[1:]), flush=True)


def make_layer(fmt: str, n: int, k: int) -> QuantizedLinear | BlockLinear:
    """An [n x k] layer of random weights in fmt, as mistol holds it."""
    if fmt in ("int8", "int4"):
        return quantize_linear(torch.randn(n, k) * 0.02, fmt)
    return BlockLinear.for_kernels(k, n, fmt, random_block_rows(fmt, n, k))


def product(layer: QuantizedLinear | BlockLinear, n: int):
    """x -> x times the layer's weights, straight through the kernels at any number of rows."""
    if isinstance(layer, QuantizedLinear):
        return lambda x: kernels.gemm(layer.fmt, x, layer.packed, n)
    matrix = kernels.matrix(layer.fmt, layer.packed, n)
    return lambda x: kernels.gemm_matrices(x, [matrix])


if __name__ == "__main__":
    run_script(main)
