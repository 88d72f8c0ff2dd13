"""Decode speed when another process keeps a core busy: mistol's default threads against
1 and 2 threads, with one `yes > /dev/null` running the whole time.

    .venv/bin/python scripts/bench_threads.py [--shapes 1b,7b] [--format int4] [--steps 32]

Each setting runs in a worker process of its own (mistol.bench.engines), loaded once; the
settings then take turns decoding a few steps each, so that they see the same load. The
default is what a command picks at start (mistol.threads) with the hog already running.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess

from mistol.bench.engines import Spec
from mistol.bench.run import Worker
from mistol.threads import default_threads

TURN = 4


def measure(shape: str, fmt: str, steps: int, cores: int) -> dict[str, float]:
    default, why = default_threads(cores)
    settings = {f"default ({default}: {why})": default, "1 thread": 1, "2 threads": 2}
    workers = {label: Worker(Spec("mistol", fmt, shape, prompts=[16], steps=steps, threads=n))
               for label, n in settings.items()}
    times: dict[str, list[float]] = {label: [] for label in workers}
    try:
        for w in workers.values():
            w.ask({"do": "prompts"})
        while any(len(t) < steps for t in times.values()):
            for label, w in workers.items():
                times[label] += w.ask({"do": "decode", "steps": TURN + 1})["steps"][1:]  # one untimed
    finally:
        for w in workers.values():
            w.close()
    return {label: 1 / statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,7b")
    parser.add_argument("--format", default="int4", choices=["int8", "int4"])
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    import torch

    cores = torch.get_num_threads()
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        for shape in args.shapes.split(","):
            speeds = measure(shape, args.format, args.steps, cores)
            best = max(speeds["1 thread"], speeds["2 threads"])
            print(f"{shape} {args.format}, one `yes` running, {cores} cores:")
            for label, speed in speeds.items():
                print(f"  {label:50s} {speed:8.2f} tok/s  ({speed / best:.2f} of the best of 1 and 2 threads)")
    finally:
        hog.kill()
        hog.wait()


if __name__ == "__main__":
    main()
