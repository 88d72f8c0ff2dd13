"""Giving memory-mapped pages back once their tensor has been copied elsewhere."""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages that lie wholly inside `tensor`'s memory.

    Only for tensors viewing a private file mapping that nothing has written to: the pages
    are clean copies of the file, so dropping them frees memory, and touching them again
    reads the file anew. This keeps peak memory near the loaded size when a checkpoint is
    converted (bf16 -> f32, or quantized) tensor by tensor.
    """
    if _libc is None or tensor.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def release_free_heap() -> None:
    """Hand the free pages inside the C heap back to the system (glibc's malloc_trim).

    Loading converts tensors through temporaries, and glibc keeps what they freed in its heap,
    counted in RSS until something reuses it: 10-30 MB after loading a 0.5B model, and a
    higher peak once it runs. A no-op where the C library has no malloc_trim."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
