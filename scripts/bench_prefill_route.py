"""Where a quantized layer's prompt rows should go: its several-row kernels, or dequantized
bf16 weights (a bf16 matrix product).

    python scripts/bench_prefill_route.py MODEL [--quant int8|int4] [--rows 64,160,320,512]
                                          [--threads 2] [--rounds 3]

On a CPU with bf16 instructions, a prefill chunk of `backend.BF16_MIN_ROWS[fmt]` rows or more
multiplies dequantized bf16 weights; fewer rows go to the quantized kernels (int8 and int4
always, unless the CPU has AMX tiles). This times the linear layers of MODEL's first block (a
GGUF file keeps its k-quants; `mistol bench --kquants` makes llama.cpp's), format by format,
both ways in turns at each row count, and prints the kernels' time over the bf16 one's: below
1 the kernels win. The crossover where it passes 1 is what BF16_MIN_ROWS should say for this
CPU. Ratios of one run only: a shared machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections import defaultdict

import torch

from mistol.engine import Engine
from mistol.errors import MistolError
from mistol.model import backend


@contextlib.contextmanager
def bf16_route(on: bool):
    """Every quantized layer on bf16 weights (on) or on its kernels (off), whatever the CPU."""
    saved_env, saved_rows = os.environ.get("MISTOL_BF16_PREFILL"), dict(backend.BF16_MIN_ROWS)
    os.environ["MISTOL_BF16_PREFILL"] = "1" if on else "0"
    backend.BF16_MIN_ROWS.update(dict.fromkeys(saved_rows, 1))
    backend.native_bf16.cache_clear()
    backend.bf16_tiles.cache_clear()
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("MISTOL_BF16_PREFILL")
        else:
            os.environ["MISTOL_BF16_PREFILL"] = saved_env
        backend.BF16_MIN_ROWS.update(saved_rows)
        backend.native_bf16.cache_clear()
        backend.bf16_tiles.cache_clear()


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
    try:
        engine = Engine.load(args.model, dtype="f32", quant=args.quant, progress=False)
    except MistolError as e:
        ap.exit(1, f"error: {e}\n")
    by_format = quantized_layers(engine.model)
    if not by_format:
        ap.exit(1, f"{args.model}: its layers are not quantized (try --quant int8)\n")
    print(f"{args.threads} thread(s); bf16 from (rows): "
          + ", ".join(f"{fmt} {backend.bf16_prefill_rows(fmt) or 'never'}" for fmt in by_format))
    with torch.inference_mode():
        for fmt, layers in by_format.items():
            shapes = ", ".join(sorted({f"{l.out_features} x {l.in_features}" for l in layers}))
            cells = []
            for m in rows:
                xs = [torch.randn(m, layer.in_features) for layer in layers]
                best = {True: float("inf"), False: float("inf")}
                for _ in range(args.rounds):
                    for on in (False, True):
                        with bf16_route(on):
                            start = time.perf_counter()
                            for layer, x in zip(layers, xs):
                                layer(x)
                            best[on] = min(best[on], time.perf_counter() - start)
                cells.append(f"{m} rows {best[False] / best[True]:.2f} ({best[False] * 1e3:.0f} / {best[True] * 1e3:.0f} ms)")
            print(f"{fmt} [{shapes}]: kernels / bf16: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
