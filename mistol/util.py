"""Small torch-free functions that several modules share."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

DEFAULT_AVAILABLE_MEMORY = 8 << 30  # where the system does not say (no /proc/meminfo)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items `a` and `b` share (token ids: what a KV cache can keep)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def available_memory() -> int:
    """Bytes of memory the system can hand out now without swapping (Linux's MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return DEFAULT_AVAILABLE_MEMORY


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them in /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def private_file(path: Path) -> Path:
    """`path`, created empty if missing, readable and writable by its owner only."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)  # one made earlier may be readable by others
    return path


def private_dir(path: Path) -> Path:
    """`path`, created if missing with its new parents, readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        path.chmod(0o700)  # one made by an older version, or by hand, may be readable by others
    except OSError:
        pass  # not ours to change: leave it
    return path


def write_fully(fd: int, data: bytes) -> None:
    """All of `data` to the file descriptor, unbuffered (os.write may take part of it);
    OSError as os.write raises it (a full disk) with what was written left in place."""
    while data:
        data = data[os.write(fd, data):]


def end_the_last_line(fd: int) -> None:
    """Before appending to a JSON Lines file (opened for reading and appending): a last line
    cut short by a crash or a full disk goes, so that it is not left between whole lines; a
    whole last line that only lacks its newline gets one."""
    size = os.fstat(fd).st_size
    tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
    if not tail or tail.endswith(b"\n"):
        return
    start = tail.rfind(b"\n") + 1
    if start == 0 and size > len(tail):
        return  # a last line longer than a MB: not cut short by us, left as it is
    try:
        json.loads(tail[start:])
    except (ValueError, RecursionError):
        os.ftruncate(fd, size - len(tail) + start)
    else:
        write_fully(fd, b"\n")
