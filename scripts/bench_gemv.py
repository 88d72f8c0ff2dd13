"""Effective GB/s of one decode GEMV (y = x @ W^T, one token) at 7B shapes, in one run.

    python scripts/bench_gemv.py [--seconds 3] [--threads N] [--impl auto|avx2|neon|scalar]
                                 [--blocks Q4_K,Q5_K,Q6_K,Q4_1,Q5_0,Q5_1] [--shapes 14336x4096,4864x896]

`--blocks` adds llama.cpp's block types, as a GGUF file's rows would load (random quants,
real-sized scales; Q4_K, Q5_K and Q6_K repacked 8 rows at a time, as mistol loads them).
Another build of the kernels (`MISTOL_KERNELS_LIB=path/to/_kernels*.so`) is timed by
running the script once with each, in turns.

GB/s = bytes of weights read per call / time per call. Each method cycles through enough
copies of its weights (>= 128 MB) that they come from memory, not the last-level cache.
The methods take turns in short rounds, so that a burst of load from other processes hits
them all alike; "median" is over every call, "best" is the best round's median. Numbers
drift with the machine: compare rows of the same run only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mistol import kernels
from mistol.bench.models import random_block_rows
from mistol.block_quant import ROW_FORMATS, BlockLinear
from mistol.errors import run_script
from mistol.model.linear import linear
from mistol.quant import QuantizedLinear, quantize_linear

SHAPES = [(14336, 4096), (4096, 14336)]  # [out, in]: gate/up and down of Mistral 7B
MIN_WORKING_SET = 128 << 20
ROUND_SECONDS = 0.05


class Method:
    def __init__(self, name: str, make, nbytes: int, call):
        self.name, self.nbytes, self.call = name, nbytes, call
        self.copies = [make() for _ in range(max(2, -(-MIN_WORKING_SET // nbytes)))]
        self.rounds: list[list[float]] = []
        self.i = 0

    def run_round(self) -> None:
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < ROUND_SECONDS or len(times) < 2:
            c = self.copies[self.i % len(self.copies)]
            self.i += 1
            t0 = time.perf_counter()
            self.call(c)
            times.append(time.perf_counter() - t0)
        self.rounds.append(times)

    def report(self) -> str:
        median = statistics.median(t for r in self.rounds for t in r)
        best = min(statistics.median(r) for r in self.rounds)
        gbs = self.nbytes / 1e9
        return (f"  {self.name:<44} {self.nbytes / 2**20:6.1f} MiB  median {median * 1e3:6.2f} ms "
                f"{gbs / median:5.1f} GB/s   best {best * 1e3:6.2f} ms {gbs / best:5.1f} GB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per shape, all methods together (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: torch's)")
    ap.add_argument("--impl", default="auto", choices=["auto", "avx512vnni", "avx2", "dotprod", "neon", "scalar"], help="mistol kernel to time")
    ap.add_argument("--blocks", default="", help="llama.cpp block types to time too, comma-separated")
    ap.add_argument("--shapes", default=None, help="[out]x[in] shapes, comma-separated (default: 7B's FFN)")
    args = ap.parse_args()
    try:
        shapes = [tuple(int(v) for v in s.split("x", 1)) for s in args.shapes.split(",")] if args.shapes else SHAPES
    except ValueError:
        ap.error(f"--shapes: expected OUTxIN[,OUTxIN...] (e.g. 14336x4096), got {args.shapes!r}")
    if any(len(s) != 2 or min(s) <= 0 for s in shapes):
        ap.error(f"--shapes: expected OUTxIN[,OUTxIN...] with positive sizes, got {args.shapes!r}")
    blocks = [b for b in args.blocks.split(",") if b]
    for b in blocks:
        if b not in ROW_FORMATS:
            ap.error(f"--blocks: {b} is not one of {', '.join(ROW_FORMATS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with kernels.use(args.impl):
        impl = kernels.impl_name()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, mistol kernels: {impl}")

    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        x = torch.randn(1, k)
        xb = x.bfloat16()
        scales = w.abs().amax(1) / 127
        w8 = (w / scales[:, None]).round().to(torch.int8)
        methods = [
            Method("F.linear fp32", w.clone, w.numel() * 4, lambda c: F.linear(x, c)),
            Method("F.linear bf16", w.bfloat16, w.numel() * 2, lambda c: F.linear(xb, c)),
            Method("aten._weight_int8pack_mm (bf16 x, per row)", w8.clone, w8.numel() + 2 * n,
                   lambda c: torch.ops.aten._weight_int8pack_mm(xb, c, scales.bfloat16())),
        ]
        for dtype, name, xd in ((torch.float32, "fp32", x), (torch.bfloat16, "bf16", xb)):  # x in the model's dtype
            methods.append(Method(f"mistol {name} (dense kernel)", lambda d=dtype: w.to(d), w.numel() * xd.element_size(),
                                  lambda c, xd=xd: linear(xd, c)))
        for fmt in ("int8", "int4"):
            q = quantize_linear(w, fmt)
            methods.append(Method(f"mistol {fmt} ({impl})", lambda q=q: QuantizedLinear(k, n, q.fmt, q.packed.clone()),
                                  q.packed.numel(), lambda c: c(x)))
        for fmt in blocks:
            block, nbytes = ROW_FORMATS[fmt]
            if k % block:
                print(f"{fmt}: {k} inputs are not whole blocks of {block}; skipped")
                continue
            rows = random_block_rows(fmt, n, k)
            methods.append(Method(f"mistol {fmt} ({impl})", lambda f=fmt, r=rows: BlockLinear.for_kernels(k, n, f, r.clone()),
                                  rows.numel(), lambda c: c(x)))
        with kernels.use(args.impl):
            for m in methods:  # warm up
                m.call(m.copies[0])
            start = time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                for m in methods:
                    m.run_round()
        print(f"\nW [{n} x {k}] (out x in), one token:")
        for m in methods:
            print(m.report())


if __name__ == "__main__":
    run_script(main)
