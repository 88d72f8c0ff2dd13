"""The model's linear layers, and the products of several that share an input.

`Linear` is a bias-free `nn.Linear` whose products with a few rows (decode steps) run on
mistol's compiled kernels on a CPU: reading the weight is the whole cost there, and the
kernel streams float32/bf16/f16 weights near the memory's speed, where PyTorch's bf16
matrix-vector product reaches well under half of it. Longer inputs (prefill is
compute-bound), other devices and training use `F.linear` (the rules: model/backend.py).
`TiledLinear` holds rows longer than 4096 inputs in tiles along K for that kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..block_quant import BlockLinear
from ..quant import BLOCK, QuantizedLinear, kernel_input, output_like, tile_blocks
from .backend import QUANTIZED_KERNELS, dense_kernel_runs, quantized_route


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class TiledLinear(nn.Module):
    """A bias-free linear layer of float weights with long rows (more than 4096 inputs: a
    down projection), held in tiles along K for decode steps on a CPU:

        tiles [T, out_features, in_features / T]: tile t holds inputs [t * in/T, (t+1) * in/T)

    The kernel multiplies tile by tile, so the tile of x stays in L1 while the weights stream
    past; from plain rows of 14336 inputs a 7B bf16 down projection read its weights half as
    fast as the other layers (the same cause as in mistol.quant's tiles). Longer inputs
    (prefill), other devices and training multiply the tiles in one batched matmul and add
    their products in float32: as fast as `F.linear` on plain rows (putting the rows back
    together first cost half as much again at 64 rows), with one more rounding per tile in
    bf16.
    """

    def __init__(self, tiles: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = tiles.shape[0] * tiles.shape[2], tiles.shape[1]
        self.tiles = nn.Parameter(tiles, requires_grad=False)

    @classmethod
    def from_rows(cls, read: Callable[[int, int], torch.Tensor], out_features: int, in_features: int,
                  dtype: torch.dtype, release: Callable | None = None) -> "TiledLinear":
        """From a weight [out, in] that `read(r0, r1)` hands out a slab of rows at a time (in
        any float dtype, converted to `dtype`); `release`, if given, is called on each slab
        once copied (loaders pass `release_pages` for slabs of a mapped file)."""
        per_tile = tile_values(in_features)
        tiles = torch.empty(in_features // per_tile, out_features, per_tile, dtype=dtype)
        step = max(1, (1 << 22) // in_features)
        for r0 in range(0, out_features, step):
            rows = read(r0, min(out_features, r0 + step))
            tiles[:, r0 : r0 + rows.shape[0]] = rows.reshape(rows.shape[0], -1, per_tile).transpose(0, 1)
            if release is not None:
                release(rows)
        return cls(tiles)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as plain rows [out_features, in_features] (a copy)."""
        return self.tiles.transpose(0, 1).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dense_kernel_runs(x, (self.tiles,)):
            return _dense(x, (self.tiles,))
        tiles, _, per_tile = self.tiles.shape
        x3 = x.reshape(-1, tiles, per_tile).transpose(0, 1)  # [tiles, rows, per_tile]
        y = torch.bmm(x3, self.tiles.transpose(1, 2)).sum(0, dtype=torch.float32)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tiles={self.tiles.shape[0]}"


def tile_values(in_features: int) -> int:
    """Inputs per tile for float rows of `in_features`: the quantized layout's tiles (blocks of
    32 inputs, see `mistol.quant.tile_blocks`); all of them where that does not apply."""
    if in_features % BLOCK:
        return in_features
    return tile_blocks(in_features) * BLOCK


def tiles_pay_off(weight_shape: Sequence[int], device: torch.device) -> bool:
    """Whether a float linear weight [out, in] should load as a `TiledLinear`: rows long
    enough to tile, on a CPU where the compiled kernels run (only their kernel gains from
    the tiles)."""
    return device.type == "cpu" and tile_values(weight_shape[1]) < weight_shape[1] and kernels.available()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a float weight [out, in] (the model's layers and a tied head)."""
    if dense_kernel_runs(x, (weight,)):
        return _dense(x, (weight,))
    return F.linear(x, weight)


def linear_many(x: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
    """The outputs of bias-free linear layers that share an input, side by side:
    [..., sum of out_features]. Layers of one kind on the CPU kernels (quantized, of any
    formats, or float of one dtype) run as one kernel call: one parallel region, one pass
    over x; any other mix runs layer by layer."""
    fused = _fused(x, layers)
    return fused if fused is not None else torch.cat([layer(x) for layer in layers], dim=-1)


def linear_each(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The outputs of bias-free linear layers that share an input, one per layer: views of
    one kernel call's output where `linear_many` fuses them, else each layer's own. For
    callers that use them apart, so that a prompt's outputs are not copied side by side (a
    7B layer's gate and up projections at 512 rows: 59 MB more, in fresh pages each time)."""
    fused = _fused(x, layers)
    if fused is None:
        return [layer(x) for layer in layers]
    return list(fused.split([layer.out_features for layer in layers], dim=-1))


def _fused(x: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor | None:
    """`linear_many`'s output where one kernel call computes it, else None."""
    first = layers[0]
    if isinstance(first, (QuantizedLinear, BlockLinear)):
        x2 = x.reshape(-1, x.shape[-1])
        if all(isinstance(la, (QuantizedLinear, BlockLinear))
               and quantized_route(x2.shape[0], x2.device, la.fmt) == QUANTIZED_KERNELS for la in layers):
            mats = [kernels.matrix(la.fmt, la.packed, la.out_features) for la in layers]
            return output_like(kernels.gemm_matrices(kernel_input(x2), mats), x)
    elif all(isinstance(la, (Linear, TiledLinear)) for la in layers):
        weights = [la.tiles if isinstance(la, TiledLinear) else la.weight for la in layers]
        if dense_kernel_runs(x, weights):
            return _dense(x, weights)
    return None


def _dense(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    # float32 products and sums, rounded once to x's dtype: what F.linear does in bf16
    y = kernels.dense_many(kernel_input(x.reshape(-1, x.shape[-1])), list(weights), x.dtype == torch.bfloat16)
    return output_like(y, x)

