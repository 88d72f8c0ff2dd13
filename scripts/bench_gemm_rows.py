"""What M activation rows cost against one, in one int8/int4 matrix product at 7B shapes.

    python scripts/bench_gemm_rows.py [--impl auto|avx512vnni|avx2|scalar] [--threads 1] [--rounds 8]
                                      [--rows 1,2,4,8,16]

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
from mistol.errors import run_script
from mistol.quant import quantize_linear

SHAPES = [(14336, 4096), (4096, 14336)]  # [out, in]: gate/up and down of Mistral 7B
MIN_WORKING_SET = 256 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="auto", choices=["auto", "avx512vnni", "avx2", "dotprod", "neon", "scalar"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--rows", default="1,2,4,8,16", help="row counts, comma-separated (1 is always timed)")
    args = ap.parse_args()
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
    for fmt in ("int8", "int4"):
        for n, k in SHAPES:
            layer = quantize_linear(torch.randn(n, k) * 0.02, fmt)
            copies = [layer.packed.clone() for _ in range(max(2, -(-MIN_WORKING_SET // layer.packed.numel())))]
            xs = {m: torch.randn(m, k) for m in rows}
            best = {m: float("inf") for m in rows}
            with kernels.use(args.impl):
                for _ in range(args.rounds):
                    for m in rows:
                        for packed in copies:
                            start = clock()
                            kernels.gemm(fmt, xs[m], packed, n)
                            best[m] = min(best[m], clock() - start)
            one = best[1]
            print(f"{fmt} [{n} x {k}]: 1 row {one * 1e3:.2f} ms ({layer.packed.numel() / one / 1e9:.1f} GB/s); "
                  + "  ".join(f"{m} rows {best[m] / one:.2f}x ({best[m] * 1e3:.1f} ms)" for m in rows[1:]), flush=True)


if __name__ == "__main__":
    run_script(main)
