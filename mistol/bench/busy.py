"""Decode speed while another process keeps a core busy: mistol's default threads against 1
and 2 threads.

With one `yes > /dev/null` running the whole time, the model is loaded three times (worker
processes, mistol.bench.engines): with the thread count a command picks at start
(`mistol.threads.default_threads`, which sees the busy core), with 1 and with 2 threads. The
three then take turns decoding a few steps each, so that they see the same load.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
from dataclasses import replace

from .engines import Spec

TURN = 4  # steps each setting decodes before the next one's turn
PR_SET_PDEATHSIG = 1


def _ends_with_the_bench() -> None:
    """(In the hog, before exec.) A SIGKILL when the bench's process ends, however it ends: a
    killed bench would otherwise leave a `yes` taking a core for good (`finally` runs on
    Ctrl-C, not on SIGKILL)."""
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def busy_core_decode(spec: Spec, cores: int, worker) -> dict:
    """spec's model (a mistol Spec) with one core busy: {"default_threads", "why", "tok_s":
    {setting: tok/s}, "of_best": default's speed over the best of 1 and 2 threads}.
    `worker(spec)` starts a worker process (bench.run.Worker)."""
    from ..threads import default_threads

    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL,
                           preexec_fn=_ends_with_the_bench if sys.platform == "linux" else None)
    workers = {}
    try:
        default, why = default_threads(cores)  # (with the hog running, as a command would start)
        settings = {"default": default, "1 thread": 1, "2 threads": 2}
        for label, n in settings.items():
            workers[label] = worker(replace(spec, prompts=[16], threads=n))
        times: dict[str, list[float]] = {label: [] for label in settings}
        for w in workers.values():
            w.ask({"do": "prompts"})
        while any(len(t) < spec.steps for t in times.values()):
            for label, w in workers.items():
                times[label] += w.ask({"do": "decode", "steps": TURN + 1})["steps"][1:]  # (one untimed)
    finally:
        for w in workers.values():
            w.close()
        hog.kill()
        hog.wait()
    speeds = {label: 1 / statistics.median(t) for label, t in times.items()}
    return {"default_threads": default, "why": why, "tok_s": speeds,
            "of_best": speeds["default"] / max(speeds["1 thread"], speeds["2 threads"])}
