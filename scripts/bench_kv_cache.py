"""Decode steps at a long context with each KV cache type (`--kv-cache f32|f16|q8_0`): the
cache's memory and the step's time, random weights.

    .venv/bin/python scripts/bench_kv_cache.py [--shape 1b] [--format int4] [--context 1500] [--steps 12] [--threads 1]

The caches are filled with random keys and values instead of a prefill (a step costs the
same whatever they hold); the three sessions then take turns, one step each, so that they
see the same load. The median step is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mistol.bench.models import QUANT_FORMATS, fill_random_context, mistol_model
from mistol.bench.shapes import SHAPES, model_config
from mistol.engine import DTYPES, KV_CACHE_DTYPES, Engine
from mistol.errors import run_script


def filled_session(engine: Engine, kv_type, context: int, generator: torch.Generator):
    engine.kv_dtype = kv_type
    session = engine.new_session(max_context=context + 64)
    fill_random_context(session, context, generator)
    return session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--format", default="int4", choices=[*QUANT_FORMATS, *DTYPES])
    ap.add_argument("--context", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if min(args.context, args.steps, args.threads) < 1:
        ap.error("--context, --steps and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    engine = Engine(mistol_model(model_config(args.shape), args.format))
    generator = torch.Generator().manual_seed(0)
    sessions = {name: filled_session(engine, kv, args.context, generator) for name, kv in KV_CACHE_DTYPES.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    with torch.inference_mode():
        for step in range(args.steps + 1):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.step(7 + step)
                if step:  # the first is a warm-up
                    times[name].append(time.perf_counter() - start)
    print(f"{args.shape} {args.format}, {args.context} tokens of context, {args.threads} thread(s)")
    for name, session in sessions.items():
        print(f"  {name:5s} cache {session.cache.nbytes / 2**20:6.1f} MiB   step {1e3 * statistics.median(times[name]):6.1f} ms")


if __name__ == "__main__":
    run_script(main)
