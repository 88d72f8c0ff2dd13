"""Decode steps replayed from CUDA graphs: one token of one session per GPU launch.

An eager decode step launches hundreds of small kernels (32 layers of norms, RoPE,
projections, attention, cache writes); on a GPU each launch costs CPU time that can exceed
the kernel's own, so a 7B step ends up bound by Python and the driver, far from the
memory bandwidth. A CUDA graph records the step's kernels once and replays them with one
launch.

A graph needs fixed shapes and no reads back to the host, so the recorded step takes its
token and position from device buffers, plans attention on the device
(`KVCache.plan_on_device`) and attends over a fixed number of cache slots under a mask.
That number grows in buckets (powers of two from `MIN_KEYS`, up to the cache's capacity),
one graph per bucket, so a short conversation does not read a long cache's empty slots.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache

MIN_KEYS = 256


def key_bucket(position: int, capacity: int, min_keys: int = MIN_KEYS) -> int:
    """Slots the step at `position` attends over: enough for every filled slot."""
    needed = min(position + 1, capacity)
    bucket = min_keys
    while bucket < needed:
        bucket *= 2
    return min(bucket, capacity)


class GraphedDecoder:
    """Single-token decode steps of one session (its model and KV cache), as graph replays."""

    def __init__(self, model, cache: KVCache, min_keys: int = MIN_KEYS):
        self.model, self.cache, self.min_keys = model, cache, min_keys
        device = cache.k.device
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1,), dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # graphs of one session share a memory pool

    def step(self, token: int, position: int) -> torch.Tensor:
        """Append `token` at `position` (= the session's length); return the float32 logits [vocab]."""
        self.token.fill_(token)
        self.position.fill_(position)
        bucket = key_bucket(position, self.cache.capacity, self.min_keys)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        graph, logits = self._graphs[bucket]
        graph.replay()
        self.cache.length = max(self.cache.length, position + 1)
        return logits[0].clone()  # the next replay overwrites the graph's output

    def _forward(self, n_keys: int) -> torch.Tensor:
        plan = self.cache.plan_on_device(self.position, n_keys)
        return self.model(self.token, self.position, [self.cache], plans=[plan])

    def _capture(self, n_keys: int):
        # Warm up on a side stream (lazy initialisation must not be recorded); these runs
        # write the same keys and values the replay will, so they change nothing.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(n_keys)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(n_keys)
        self._pool = graph.pool()
        return graph, logits
