"""How many threads a model runs on when the person does not say.

A decode step is a few hundred parallel regions, each ending at a barrier. When another
process keeps one of the cores busy, the thread that shares that core is preempted for a
scheduler slice (milliseconds) at a time, and every barrier waits for it: on a 2-core
machine with one `yes > /dev/null` running, two threads decoded at a twentieth of the
speed of one. So the default counts the cores that are idle now (a 50 ms look at
/proc/stat) and runs on those, one per idle core, at least one; `--threads N` or
`MISTOL_THREADS` overrides it.
"""

from __future__ import annotations

import os
import time

BUSY_SHARE = 0.5  # a core busy for more than half of the look is taken by other work
LOOK_S = 0.05


def _cpu_times() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of each CPU since boot, from /proc/stat ({} where unreadable)."""
    times = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                numbers = [int(v) for v in values[:8]]
                idle = numbers[3] + (numbers[4] if len(numbers) > 4 else 0)  # idle + iowait
                times[int(name[3:])] = (sum(numbers) - idle, sum(numbers))
    except (OSError, ValueError, IndexError):
        return {}
    return times


def busy_cpus(look_s: float = LOOK_S) -> int | None:
    """How many of the CPUs this process may run on are busy with other work right now
    (None where /proc/stat cannot tell, as on macOS)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    before = _cpu_times()
    if not before:
        return None
    time.sleep(look_s)  # (this process sleeps meanwhile: what is busy is others' work)
    after = _cpu_times()
    busy = 0
    for cpu, (busy0, total0) in before.items():
        if allowed is not None and cpu not in allowed or cpu not in after:
            continue
        busy1, total1 = after[cpu]
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) > BUSY_SHARE:
            busy += 1
    return busy


def default_threads(cores: int) -> tuple[int, str]:
    """The threads to run on out of `cores` (torch's default, one per core), and why."""
    busy = busy_cpus()
    if not busy:
        return cores, f"one per core ({cores})"
    n = max(1, cores - busy)
    return n, f"{n} of {cores} cores: {busy} busy with other work (--threads N to choose)"
