"""The KV cache of one conversation: preallocated, written in place, bounded by the window.

Each slot of the cache remembers which absolute position it holds (`slot_pos`, -1 when
empty). Position p lives in slot p % capacity, so for a sliding-window model the cache is
a rolling buffer (as in Mistral's reference implementation) and its memory never grows
past `window + chunk` positions, however long the conversation. The attention mask is
derived from `slot_pos`, which keeps one code path for plain, windowed and wrapped caches.

Keys and values are held in float32, float16 or `Q8_0`: llama.cpp's Q8_0 blocks (its
`--cache-type-k/-v q8_0`) laid out as two tensors, int8 values [..., capacity, head_dim] and
a float16 scale per 32 of them [..., capacity, head_dim / 32], so that a slot is still one
index along the capacity axis (rollback, the rolling buffer and saved files work on slots
alone). Rows are quantized as they are written and dequantized as attention reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MistolError
from .config import ModelConfig

Q8_0 = "q8_0"  # the cache type of int8 values with a float16 scale per block of 32 (llama.cpp's Q8_0)
Q8_BLOCK = 32
KVType = torch.dtype | str  # torch.float32, torch.float16 (or the model's dtype), or Q8_0


def check_kv_type(config: ModelConfig, kv_type: KVType) -> None:
    """Raise MistolError when a cache of `kv_type` cannot hold this model's keys and values."""
    if kv_type == Q8_0 and config.head_dim % Q8_BLOCK:
        raise MistolError(f"--kv-cache q8_0 needs a head size that is a multiple of {Q8_BLOCK} (this model's is "
                          f"{config.head_dim}): use --kv-cache f16")


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] (n a multiple of 32) -> int8 values [..., n] and float16 scales [..., n / 32],
    as llama.cpp's quantize_row_q8_0_ref: d = max|x| / 127 per block, q = roundf(x / d) (times
    1/d in float32, halves rounded away from zero). The compiled decode layer writes the same bits."""
    blocks = x.float().unflatten(-1, (-1, Q8_BLOCK))
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    v = blocks * inv
    r = v.trunc()
    q = r + torch.where((v - r).abs() >= 0.5, v.sign(), torch.zeros_like(v))
    return q.to(torch.int8).flatten(-2), d.squeeze(-1).to(torch.float16)


def dequantize_q8_0(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 values [..., n] and float16 scales [..., n / 32] -> [..., n] in `dtype` (each
    value q * d, exact in float32)."""
    x = q.float().unflatten(-1, (-1, Q8_BLOCK)) * scales.float()[..., None]
    return x.flatten(-2).to(dtype)


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
        dtype: KVType,
        device: torch.device | str = "cpu",
        batch_size: int = 1,
    ):
        check_kv_type(config, dtype)
        self.dtype = dtype
        shape = (config.num_layers, batch_size, config.num_kv_heads, capacity, config.head_dim)
        storage = torch.int8 if dtype == Q8_0 else dtype
        self.k = torch.zeros(shape, dtype=storage, device=device)
        self.v = torch.zeros(shape, dtype=storage, device=device)
        # Q8_0: the scales of k's and v's blocks; None otherwise
        scale_shape = (*shape[:-1], config.head_dim // Q8_BLOCK)
        self.k_scale = torch.zeros(scale_shape, dtype=torch.float16, device=device) if dtype == Q8_0 else None
        self.v_scale = torch.zeros(scale_shape, dtype=torch.float16, device=device) if dtype == Q8_0 else None
        self.slot_pos = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.capacity = capacity
        # A window at least as long as the cache never slides: attention is plain causal.
        window = config.sliding_window
        self.window = window if window is not None and window < capacity else None
        self.length = 0  # positions [0, length) have been written

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The storage by name, each [layers, batch, kv_heads, capacity, ...]: slot s of every
        one of them is [:, :, :, s]."""
        named = {"k": self.k, "v": self.v, "k_scale": self.k_scale, "v_scale": self.v_scale}
        return {name: t for name, t in named.items() if t is not None}

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values [batch, kv_heads, len(slots), head_dim] in `slots` of `layer`."""
        if self.dtype == Q8_0:
            for rows, scales, new in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
                q, d = quantize_q8_0(new)
                rows[layer].index_copy_(2, slots, q)
                scales[layer].index_copy_(2, slots, d)
        else:
            self.k[layer].index_copy_(2, slots, k.to(self.k.dtype))
            self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))

    def read(self, layer: int, n_keys: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of slots [0, n_keys) of `layer`, [batch, kv_heads, n_keys, head_dim], in `dtype`."""
        k, v = self.k[layer, :, :, :n_keys], self.v[layer, :, :, :n_keys]
        if self.dtype == Q8_0:
            return (dequantize_q8_0(k, self.k_scale[layer, :, :, :n_keys], dtype),
                    dequantize_q8_0(v, self.v_scale[layer, :, :, :n_keys], dtype))
        # (a cache in fewer bytes than the model computes in, float16 on a CPU, is read back as its dtype)
        return k.to(dtype), v.to(dtype)

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
