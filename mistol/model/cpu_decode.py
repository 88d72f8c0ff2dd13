"""Decode steps of one sequence on a CPU with quantized weights: each decoder layer as one
call into the compiled kernels (csrc/mistol_decode.c).

The same layer in PyTorch is some 25 small operations besides its four matrix products,
each costing ~10 µs of dispatch on a CPU: a tenth of a 7B int4 step. The compiled layer
does the same float32 arithmetic in one parallel region. When a step takes this path is
the execution plan's decision (model/backend.py).
"""

from __future__ import annotations

import ctypes

import torch

from .. import kernels
from .kv_cache import AttentionPlan, KVCache

_WEIGHTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # in mistol_decode_layer's order
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_POINTERS = len(_NORMS) + len(_WEIGHTS) + 5  # then cache k and v, cos, sin, mask


class CpuDecoder:
    """A model's layers, ready for `mistol_decode_layer`."""

    def __init__(self, config, layers: list[tuple[list[str], list[torch.Tensor]]]):
        self.eps = float(config.rms_norm_eps)
        self.shape = (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                      config.head_dim)
        self.tensors = [tensors for _, tensors in layers]  # kept alive: we hold their addresses
        self.formats = [kernels.format_ids(fmts) for fmts, _ in layers]
        self.tiles = [(ctypes.c_int64 * len(_WEIGHTS))(*(t.shape[2] for t in tensors[len(_NORMS):]))
                      for _, tensors in layers]
        self.pointers = [[t.data_ptr() for t in tensors] for _, tensors in layers]

    @classmethod
    def of(cls, model: torch.nn.Module) -> CpuDecoder | None:
        """The decoder for `model`'s layers as they are now, or None when they do not fit
        the compiled path. It holds the tensors' addresses (and the tensors, to keep them
        alive): make a new one when the model's modules change or move."""
        layers = _layers(model)
        return cls(model.config, layers) if layers else None

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
            plan: AttentionPlan) -> torch.Tensor:
        """All layers for x [1, 1, hidden], the new token's embedding (cos/sin: its RoPE
        values, [1, 1, 1, head_dim]): the hidden state after the last layer."""
        x = x.contiguous().clone()  # updated in place, layer by layer
        cos, sin = cos.contiguous(), sin.contiguous()
        mask = None if plan.mask is None else plan.mask.contiguous()
        dims = (ctypes.c_int64 * 8)(*self.shape, cache.capacity, int(plan.slots[0]), plan.n_keys)
        step = [cos.data_ptr(), sin.data_ptr(), 0 if mask is None else mask.data_ptr()]
        k0, v0, layer_bytes = cache.k.data_ptr(), cache.v.data_ptr(), cache.k[0].nbytes
        for i, (fmts, tiles, weights) in enumerate(zip(self.formats, self.tiles, self.pointers)):
            pointers = (ctypes.c_void_p * _POINTERS)(*weights, k0 + i * layer_bytes, v0 + i * layer_bytes, *step)
            kernels.decode_layer(fmts, tiles, x, pointers, dims, self.eps)
        return x


def _layers(model: torch.nn.Module):
    """Per layer: the formats of its seven linear layers and its tensors (the two norms'
    weights, then the packed weights), if every linear layer is quantized and every norm
    is float32, all on the CPU; else None."""
    layers = []
    for block in model.layers:
        linears = [block.get_submodule(name) for name in _WEIGHTS]
        norms = [block.get_parameter(name) for name in _NORMS]
        packed = [_packed_weight(la) for la in linears]
        if any(p is None or p.device.type != "cpu" for p in packed) or any(
            n.dtype != torch.float32 or n.device.type != "cpu" or not n.is_contiguous() for n in norms
        ):
            return None
        layers.append(([la.fmt for la in linears], [*norms, *packed]))
    return layers


def _packed_weight(layer: torch.nn.Module) -> torch.Tensor | None:
    """The weight of a layer in mistol.quant's packed int8/int4 layout (a `QuantizedLinear`:
    its `fmt` and `packed` buffer), or None for any other layer."""
    packed = getattr(layer, "packed", None)
    return packed if packed is not None and isinstance(getattr(layer, "fmt", None), str) else None
