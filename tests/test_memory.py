"""Giving memory back: the C heap's free pages after loading."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mistol.weights import memory

FREED_HEAP_SCRIPT = """
from mistol.bench.engines import memory_status
from mistol.weights.memory import release_free_heap
chunks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MiB of heap, pinned by its last chunk
del chunks[:-1]
before = memory_status()["VmRSS"]
release_free_heap()
print((before - memory_status()["VmRSS"]) // 2**20)
"""


@pytest.mark.skipif(getattr(memory._libc, "malloc_trim", None) is None, reason="the C library has no malloc_trim")
def test_free_heap_pages_go_back_to_the_system():
    # (a process of its own: what other tests left in this one's heap would count too)
    result = subprocess.run([sys.executable, "-c", FREED_HEAP_SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 150  # MiB given back, of the 200 freed
