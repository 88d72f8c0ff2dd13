"""Where the time of one decode step goes: the linear layers (GEMV) against everything else.

    python scripts/profile_decode.py [--shape 7b] [--quant int8] [--context 64] [--steps 32]
    python scripts/profile_decode.py --model FILE.gguf     # a model of your own (a Q4_K_M file, ...)

Builds a random-weight model of the shape (as `mistol bench` does) or loads `--model`, fills a context, then
times `--steps` greedy decode steps: plain (quantized models on a CPU run each layer as one
compiled call, see mistol/model/cpu_decode.py), with the PyTorch layers, and with the
PyTorch layers and every linear layer timed on its own. The rest of the PyTorch step is
listed by operator with torch.profiler (norms, RoPE, attention, cache writes, the Python
between them).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from mistol.bench.models import mistol_model
from mistol.bench.shapes import SHAPES, model_config
from mistol.block_quant import BlockLinear
from mistol.engine import Engine, decode_step
from mistol.errors import run_script
from mistol.model import transformer
from mistol.model.linear import linear_many
from mistol.quant import QuantizedLinear


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", choices=list(SHAPES))
    parser.add_argument("--quant", default="int8", choices=["int8", "int4", "bf16", "f32"])
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--model", default=None, help="a model directory or .gguf file instead of --shape/--quant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        print(f"loading {args.model} ...", file=sys.stderr)
        engine = Engine.load(args.model, progress=False)
        what = f"{Path(args.model).name} as loaded"
    else:
        print(f"building a random {args.shape} model in {args.quant} ...", file=sys.stderr)
        engine = Engine(mistol_model(model_config(args.shape), args.quant))
        what = f"{args.shape} {args.quant}"
    session = engine.new_session(max_context=args.context + 5 * args.steps + 32)
    token = int(session.feed([1] + list(range(300, 300 + args.context - 1))).argmax())

    def steps(n: int) -> list[float]:
        nonlocal token
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            token = int(decode_step([session], [token])[0].argmax())
            times.append(time.perf_counter() - t0)
        return times

    linear_time: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    name_of = {module: name.rsplit(".", 1)[-1] for name, module in engine.model.named_modules()}

    def timed(module):
        forward = module.forward

        def run(x):
            t0 = time.perf_counter()
            y = forward(x)
            linear_time[name_of[module]] += time.perf_counter() - t0
            calls[name_of[module]] += 1
            return y

        return run

    def timed_many(x, layers):  # q/k/v and gate/up run as one call
        kind = "+".join(name_of[layer] for layer in layers)
        t0 = time.perf_counter()
        y = linear_many(x, layers)
        linear_time[kind] += time.perf_counter() - t0
        calls[kind] += 1
        return y

    compiled_decoder = engine.backend.cpu_decoder
    compiled = compiled_decoder is not None
    linears = [m for m in engine.model.modules() if isinstance(m, (QuantizedLinear, BlockLinear, nn.Linear))]

    @contextlib.contextmanager
    def mode(name: str):
        """"compiled": as mistol runs; "pytorch": the PyTorch layers; "timed": the PyTorch
        layers with each linear layer timed."""
        if name != "compiled":
            engine.backend.cpu_decoder = None
        if name == "timed":
            transformer.linear_many = timed_many
            for m in linears:
                m.forward = timed(m)
        try:
            yield
        finally:
            engine.backend.cpu_decoder = compiled_decoder
            if name == "timed":
                transformer.linear_many = linear_many
                for m in linears:
                    del m.forward  # back to the class's method

    # The modes take turns, a few steps at a time: this machine's bandwidth drifts.
    times: dict[str, list[float]] = {"compiled": [], "pytorch": [], "timed": []}
    rounds = max(1, args.steps // 4)
    with torch.inference_mode():
        steps(4)  # warm up
        for _ in range(rounds):
            for name in times:
                with mode(name):
                    steps(1)
                    times[name] += steps(4)
        with mode("pytorch"), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            steps(8)

    n_timed = len(times["timed"])
    per_step = {k: v / (n_timed + rounds) for k, v in linear_time.items()}  # (+ each round's untimed first step)
    gemv = sum(per_step.values())
    step, pytorch_step = statistics.median(times["compiled"]), statistics.median(times["pytorch"])
    total = statistics.mean(times["timed"])
    print(f"\n{what}, context {args.context}, {torch.get_num_threads()} threads")
    print(f"decode step (median of {len(times['compiled'])}): {step * 1e3:.1f} ms = {1 / step:.2f} tok/s"
          + (" (compiled layers)" if compiled else ""))
    if compiled:
        print(f"with the PyTorch layers: {pytorch_step * 1e3:.1f} ms ({(pytorch_step - step) * 1e3:.1f} ms more)")
    print(f"PyTorch layers, each linear layer timed: {total * 1e3:.1f} ms per step, of which linear layers "
          f"{gemv * 1e3:.1f} ms ({100 * gemv / total:.1f}%), everything else {(total - gemv) * 1e3:.1f} ms "
          f"({100 * (total - gemv) / total:.1f}%)")
    for kind, t in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<10} {t * 1e3:7.2f} ms per step ({calls[kind] // (n_timed + rounds)} calls)")
    print("\nthe other operators of the PyTorch layers (8 steps, torch.profiler; our kernels run inside the "
          "linear layers):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    run_script(main)
