"""Decode tok/s of GGUF files under two or more builds of the kernels, in turns, in one run.

    python scripts/ab_kernels.py FILE.gguf [FILE.gguf ...] --lib OLD.so --lib NEW.so
                                 [--threads 2] [--rounds 30] [--steps 4]

A build is a shared library of csrc/ (for example `gcc -O3 -std=gnu11 -ffp-contract=off
-fvisibility=hidden -fopenmp -fPIC -shared -Icsrc csrc/*.c -lm -o new.so`); "-" is the
installed one. For each file, one `mistol bench` worker per build loads it
(MISTOL_KERNELS_LIB), then they take turns decoding --steps greedy steps each, --rounds
times, so that the machine's memory bandwidth, which drifts within minutes, is the same for
every build. Prints each build's median tok/s and its ratio to the first build's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from mistol.bench.engines import Spec
from mistol.bench.run import Worker, WorkerError, gguf_label
from mistol.errors import MistolError, run_script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--lib", action="append", required=True, help="a kernels build (repeat; '-': the installed one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    missing = [lib for lib in args.lib if lib != "-" and not Path(lib).is_file()]
    if missing:  # mistol would fall back to PyTorch ops and time those
        parser.error(f"no such kernels build: {', '.join(missing)}")
    if missing := [str(path) for path in args.files if not path.is_file()]:
        parser.error(f"no such file: {', '.join(missing)}")

    for path in args.files:
        workers = []
        try:
            for lib in args.lib:
                os.environ.pop("MISTOL_KERNELS_LIB", None)
                if lib != "-":
                    os.environ["MISTOL_KERNELS_LIB"] = str(Path(lib).resolve())
                # (steps: sizes the context for every turn)
                spec = Spec("mistol", gguf_label(path), path.name, [64], args.rounds * args.steps, args.threads,
                            gguf=str(path))
                workers.append(Worker(spec))
                workers[-1].ask({"do": "prompts"})  # warm up and leave a context to decode from
            times = [[] for _ in workers]
            for _ in range(args.rounds):
                for worker, t in zip(workers, times):
                    t += worker.ask({"do": "decode", "steps": args.steps})["steps"]
            impls = [worker.ask({"do": "finish"})["kernels"] for worker in workers]
        except (WorkerError, MistolError) as e:
            sys.exit(f"ab_kernels: {path.name}: {e}")
        finally:
            for worker in workers:
                worker.close()
        speeds = [1 / statistics.median(t) for t in times]
        print(f"{path.name}, {args.threads} threads, {args.rounds} turns of {args.steps} steps:")
        for lib, impl, speed in zip(args.lib, impls, speeds):
            print(f"  {lib:40s} {impl:12s} {speed:7.2f} tok/s  {speed / speeds[0]:.3f}x")


if __name__ == "__main__":
    run_script(main)  # (Ctrl-C reaches the workers too; they are gone by then)
