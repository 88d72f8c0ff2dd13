"""Where a quantized layer's prompt rows should go: its several-row kernels, an int8 product
with the weights requantized 8 rows at a time (repacked k-quants, AVX512-VNNI), or
dequantized bf16 weights (a bf16 matrix product).

    python scripts/bench_prefill_route.py MODEL [--quant int8|int4] [--rows 64,160,320,512]
                                          [--threads 2] [--rounds 3]

With AVX512-VNNI, a prefill chunk of `backend.INT8_MIN_ROWS[impl][fmt]` rows or more of a
repacked k-quant layer is requantized to int8; on a CPU with bf16 instructions, a chunk of
`backend.BF16_MIN_ROWS[fmt]` rows or more of the others multiplies dequantized bf16 weights;
fewer rows go to the quantized kernels (int8 and int4 always, unless the CPU has AMX tiles).
Where the process may use AMX int8 tiles, the k-quants' int8 route multiplies in them, from
`backend.TILES_INT8_MIN_ROWS` rows with no bf16 crossover (MISTOL_AMX=0: the VNNI path).
This times the linear layers of MODEL's first block (a GGUF file keeps its k-quants; `mistol
bench --kquants` makes llama.cpp's), format by format, every route in turns at each row
count, and prints each route's time over the kernels' one: below 1 that route wins. Where it
passes 1 is the crossover the tables should say for this CPU. Ratios of one run only: a
shared machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict

import torch

from mistol import kernels
from mistol.block_quant import INT8_ROUTE_FORMATS
from mistol.engine import Engine
from mistol.errors import run_script
from mistol.model import backend


@contextlib.contextmanager
def route(name: str):
    """Every quantized layer on one route (backend.QUANTIZED_KERNELS, INT8_PREFILL or
    BF16_PREFILL), whatever the CPU and the row count."""
    chosen = backend.quantized_route
    backend.quantized_route = lambda rows, device, fmt: name
    try:
        yield
    finally:
        backend.quantized_route = chosen


def quantized_layers(model) -> dict[str, list]:
    """The first block's quantized linear layers, by format."""
    layers = defaultdict(list)
    for module in model.layers[0].modules():
        if hasattr(module, "fmt") and hasattr(module, "in_features"):
            layers[module.fmt].append(module)
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a GGUF file or model directory")
    ap.add_argument("--quant", choices=["int8", "int4"], help="quantize a float checkpoint's layers as they load")
    ap.add_argument("--rows", default="64,160,320,512", help="row counts, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        rows = [int(m) for m in args.rows.split(",") if m.strip()]
    except ValueError:
        ap.error(f"--rows: comma-separated row counts, not {args.rows!r}")
    if not rows or min(rows) < 1:
        ap.error("--rows: each count must be at least 1")
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, dtype="f32", quant=args.quant, progress=False)
    by_format = quantized_layers(engine.model)
    if not by_format:
        ap.exit(1, f"{args.model}: its layers are not quantized (try --quant int8)\n")
    print(f"{args.threads} thread(s), {kernels.impl_name()} kernels; int8 / bf16 from (rows): "
          + ", ".join(f"{fmt} {backend.int8_prefill_rows(fmt) or 'never'} / {backend.bf16_prefill_rows(fmt) or 'never'}"
                      for fmt in by_format))
    with torch.inference_mode():
        for fmt, layers in by_format.items():
            shapes = ", ".join(sorted({f"{l.out_features} x {l.in_features}" for l in layers}))
            routes = [backend.QUANTIZED_KERNELS, backend.BF16_PREFILL]
            if fmt in INT8_ROUTE_FORMATS:
                routes.insert(1, backend.INT8_PREFILL)
            cells = []
            for m in rows:
                xs = [torch.randn(m, layer.in_features) for layer in layers]
                best = {name: float("inf") for name in routes}
                for _ in range(args.rounds):
                    for name in routes:
                        with route(name):
                            start = time.perf_counter()
                            for layer, x in zip(layers, xs):
                                layer(x)
                            best[name] = min(best[name], time.perf_counter() - start)
                base = best[backend.QUANTIZED_KERNELS]
                cells.append(f"{m} rows " + " ".join(f"{best[name] / base:.2f}" for name in routes[1:])
                             + f" ({' / '.join(f'{best[name] * 1e3:.0f}' for name in routes)} ms)")
            print(f"{fmt} [{shapes}]: {' and '.join(routes[1:])} over kernels: " + "  ".join(cells), flush=True)

if __name__ == "__main__":
    run_script(main)
