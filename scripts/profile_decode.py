"""Where the time of one decode step goes: the linear layers (GEMV) against everything else.

    python scripts/profile_decode.py [--shape 7b] [--quant int8] [--context 64] [--steps 32]

Builds a random-weight model of the shape (as `mistol bench` does), fills a context, then
times `--steps` greedy decode steps twice: once plain (the step time), once with every
linear layer timed on its own. The rest of the step is listed by operator with
torch.profiler (norms, RoPE, attention, cache writes, the Python between them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch import nn

from mistol.bench.models import mistol_model
from mistol.bench.shapes import model_config
from mistol.engine import Engine, decode_step
from mistol.model import transformer
from mistol.model.linear import linear_many
from mistol.quant import QuantizedLinear


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--quant", default="int8", choices=["int8", "int4", "bf16", "f32"])
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"building a random {args.shape} model in {args.quant} ...", file=sys.stderr)
    engine = Engine(mistol_model(model_config(args.shape), args.quant))
    session = engine.new_session(max_context=args.context + 3 * args.steps + 16)
    token = int(session.feed([1] + list(range(300, 300 + args.context - 1))).argmax())

    def steps(n: int) -> list[float]:
        nonlocal token
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            token = int(decode_step([session], [token])[0].argmax())
            times.append(time.perf_counter() - t0)
        return times

    with torch.inference_mode():
        steps(4)  # warm up
        step = statistics.median(steps(args.steps))

        linear_time: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        originals = {}
        kinds = (QuantizedLinear, nn.Linear)
        for name, module in engine.model.named_modules():
            if isinstance(module, kinds):
                kind = name.rsplit(".", 1)[-1]
                forward = module.forward

                def timed(x, _forward=forward, _kind=kind):
                    t0 = time.perf_counter()
                    y = _forward(x)
                    linear_time[_kind] += time.perf_counter() - t0
                    calls[_kind] += 1
                    return y

                originals[module] = forward
                module.forward = timed

        def timed_many(x, layers):  # q/k/v and gate/up run as one call
            kind = "+".join(name_of[layer] for layer in layers)
            t0 = time.perf_counter()
            y = linear_many(x, layers)
            linear_time[kind] += time.perf_counter() - t0
            calls[kind] += 1
            return y

        name_of = {module: name.rsplit(".", 1)[-1] for name, module in engine.model.named_modules()}
        transformer.linear_many = timed_many
        timed_steps = steps(args.steps)
        transformer.linear_many = linear_many
        for module, forward in originals.items():
            module.forward = forward

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            steps(8)

    per_step = {k: v / args.steps for k, v in linear_time.items()}
    gemv = sum(per_step.values())
    total = statistics.mean(timed_steps)
    print(f"\n{args.shape} {args.quant}, context {args.context}, {torch.get_num_threads()} threads")
    print(f"decode step (median of {args.steps}): {step * 1e3:.1f} ms = {1 / step:.2f} tok/s")
    print(f"with each linear layer timed: {total * 1e3:.1f} ms per step, of which linear layers "
          f"{gemv * 1e3:.1f} ms ({100 * gemv / total:.1f}%), everything else {(total - gemv) * 1e3:.1f} ms "
          f"({100 * (total - gemv) / total:.1f}%)")
    for kind, t in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<10} {t * 1e3:7.2f} ms per step ({calls[kind] // args.steps} calls)")
    print("\nthe other operators (8 steps, torch.profiler; our kernels run inside the linear layers):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
