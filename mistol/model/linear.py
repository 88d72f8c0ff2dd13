"""The model's linear layers, and the products of several that share an input.

`Linear` is a bias-free `nn.Linear` whose products with a few rows (decode steps) run on
mistol's compiled kernels on a CPU: reading the weight is the whole cost there, and the
kernel streams float32/bf16/f16 weights near the memory's speed, where PyTorch's bf16
matrix-vector product reaches well under half of it. Longer inputs (prefill is
compute-bound), other devices and training use `F.linear`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..quant import QuantizedLinear, kernel_input, output_like

DENSE_MAX_ROWS = 4  # rows of input up to which float weights use the kernel


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a float weight [out, in] (the model's layers and a tied head)."""
    if _on_dense_kernel(x, (weight,)):
        return _dense(x, (weight,))
    return F.linear(x, weight)


def linear_many(x: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
    """The outputs of bias-free linear layers that share an input, side by side:
    [..., sum of out_features]. Layers of one kind on the CPU kernels (quantized of one
    format, or float of one dtype) run as one kernel call: one parallel region, one pass
    over x; any other mix runs layer by layer."""
    first = layers[0]
    if isinstance(first, QuantizedLinear):
        x2 = x.reshape(-1, x.shape[-1])
        if first._on_kernels(x2) and all(isinstance(la, QuantizedLinear) and la.fmt == first.fmt for la in layers):
            y = kernels.gemm_many(first.fmt, kernel_input(x2), [(la.packed, la.out_features) for la in layers])
            return output_like(y, x)
    elif all(isinstance(la, Linear) for la in layers):
        weights = [la.weight for la in layers]
        if _on_dense_kernel(x, weights):
            return _dense(x, weights)
    return torch.cat([layer(x) for layer in layers], dim=-1)


def _on_dense_kernel(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    dtype = weights[0].dtype
    return (
        x.device.type == "cpu"
        and x.numel() <= DENSE_MAX_ROWS * x.shape[-1]
        and dtype in kernels.DENSE_DTYPES
        and all(w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous() for w in weights)
        and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
        and kernels.available()
    )


def _dense(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    # float32 products and sums, rounded once to x's dtype: what F.linear does in bf16
    y = kernels.dense_many(kernel_input(x.reshape(-1, x.shape[-1])), list(weights), x.dtype == torch.bfloat16)
    return output_like(y, x)

