"""Decode speed when another process keeps a core busy: mistol's default threads against
1 and 2 threads, with one `yes > /dev/null` running the whole time.

    .venv/bin/python scripts/bench_threads.py [--shapes 1b,7b] [--format int4] [--steps 32]

Each setting runs in a worker process of its own (mistol.bench.engines), loaded once; the
settings then take turns decoding a few steps each, so that they see the same load. The
default is what a command picks at start (mistol.threads) with the hog already running.
"""

from __future__ import annotations

import argparse

from mistol.bench.busy import busy_core_decode
from mistol.bench.engines import Spec
from mistol.bench.run import Worker
from mistol.bench.shapes import SHAPES
from mistol.errors import run_script


def measure(shape: str, fmt: str, steps: int, cores: int) -> dict[str, float]:
    found = busy_core_decode(Spec("mistol", fmt, shape, steps=steps), cores, Worker)
    return {f"default ({found['default_threads']}: {found['why']})": found["tok_s"]["default"],
            **{k: v for k, v in found["tok_s"].items() if k != "default"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,7b")
    parser.add_argument("--format", default="int4", choices=["int8", "int4"])
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    unknown = [shape for shape in args.shapes.split(",") if shape not in SHAPES]
    if unknown:
        parser.error(f"--shapes: comma-separated, of {', '.join(SHAPES)}; not {', '.join(unknown)}")
    import torch

    cores = torch.get_num_threads()
    for shape in args.shapes.split(","):
        speeds = measure(shape, args.format, args.steps, cores)
        best = max(speeds["1 thread"], speeds["2 threads"])
        print(f"{shape} {args.format}, one `yes` running, {cores} cores:")
        for label, speed in speeds.items():
            print(f"  {label:50s} {speed:8.2f} tok/s  ({speed / best:.2f} of the best of 1 and 2 threads)")


if __name__ == "__main__":
    run_script(main)
