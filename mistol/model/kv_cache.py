"""The KV cache of one conversation: preallocated, written in place, bounded by the window.

Each slot of the cache remembers which absolute position it holds (`slot_pos`, -1 when
empty). Position p lives in slot p % capacity, so for a sliding-window model the cache is
a rolling buffer (as in Mistral's reference implementation) and its memory never grows
past `window + chunk` positions, however long the conversation. The attention mask is
derived from `slot_pos`, which keeps one code path for plain, windowed and wrapped caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


@dataclass
class AttentionPlan:
    """Where one forward step writes its keys/values and what each query may attend to."""

    slots: torch.Tensor  # [L] cache slots of the new tokens
    n_keys: int  # attend over cache slots [0, n_keys)
    mask: torch.Tensor | None  # [L, n_keys] bool, True = may attend; None = attend to all


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch_size: int = 1,
    ):
        shape = (config.num_layers, batch_size, config.num_kv_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.capacity = capacity
        # A window at least as long as the cache never slides: attention is plain causal.
        window = config.sliding_window
        self.window = window if window is not None and window < capacity else None
        self.length = 0  # positions [0, length) have been written

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def plan(self, positions: torch.Tensor) -> AttentionPlan:
        """Claim the slots for `positions` (consecutive, starting at `self.length`)."""
        n = positions.numel()
        if self.window is not None:
            # Keys still needed by the first query may not be overwritten by the last one.
            assert n + self.window - 1 <= self.capacity, "chunk too long for this cache"
        else:
            assert int(positions[-1]) < self.capacity, "position beyond the cache"
        slots = positions % self.capacity
        self.slot_pos[slots] = positions
        self.length = int(positions[-1]) + 1
        n_keys = min(self.length, self.capacity)

        if n == 1 and (self.window is None or self.length <= self.window):
            return AttentionPlan(slots, n_keys, None)  # one query sees every filled slot
        return AttentionPlan(slots, n_keys, self._mask(positions, n_keys))

    def plan_on_device(self, positions: torch.Tensor, n_keys: int) -> AttentionPlan:
        """`plan` for the next token at `positions` ([1], on the device), attending over the
        first `n_keys` slots under a mask, without reading anything back to the host: a
        CUDA graph can capture it. The caller knows the position and sets `length`."""
        slots = positions % self.capacity
        self.slot_pos.index_copy_(0, slots, positions)
        return AttentionPlan(slots, n_keys, self._mask(positions, n_keys))

    def _mask(self, positions: torch.Tensor, n_keys: int) -> torch.Tensor:
        """[L, n_keys]: query at position p sees the filled slots at positions <= p (within the window)."""
        key_pos = self.slot_pos[:n_keys]
        q = positions[:, None]
        mask = (key_pos >= 0) & (key_pos <= q)
        if self.window is not None:
            mask &= q - key_pos < self.window
        return mask

    def truncate(self, length: int) -> bool:
        """Forget positions >= `length`. False if the cache can no longer serve that state
        exactly (a rolling buffer already overwrote keys that position `length` needs)."""
        if length >= self.length:
            return True
        needed_from = max(0, length - self.window) if self.window else 0
        self.slot_pos[self.slot_pos >= length] = -1
        self.length = length
        if length == 0:
            return True
        needed = torch.arange(needed_from, length, device=self.slot_pos.device)
        return bool((self.slot_pos[needed % self.capacity] == needed).all())

    def reset(self):
        self.slot_pos.fill_(-1)
        self.length = 0
