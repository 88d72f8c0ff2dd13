"""Decode steps of one sequence on a CPU with quantized weights: each decoder layer as one
call into the compiled kernels (csrc/mistol_decode.c), its arguments one struct
(`kernels.abi.DecodeArgs`) and its scratch a workspace kept with the decoder.

The same layer in PyTorch is some 25 small operations besides its four matrix products,
each costing ~10 µs of dispatch on a CPU: a tenth of a 7B int4 step. The compiled layer
does the same float32 arithmetic in one parallel region. Anything else (prefill, several
sequences, float weights, CUDA, autograd) runs the PyTorch layers.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import torch

from .. import kernels
from ..quant import QuantizedLinear
from .kv_cache import AttentionPlan, KVCache

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # where each matrix sits in a layer
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def _weight_paths() -> list[str]:
    """The module paths of a layer's matrices, in the order the compiled layer takes them."""
    return [f"{_PARENT[name]}.{name}" for name in kernels.abi().decode_weights]


class CpuDecoder:
    """A model's layers, ready for `mistol_decode_layer`."""

    def __init__(self, config, layers: list[tuple[list[QuantizedLinear], list[torch.Tensor]]]):
        self.eps = float(config.rms_norm_eps)
        self.shape = dict(hidden=config.hidden_size, ffn=config.intermediate_size, heads=config.num_heads,
                          kv_heads=config.num_kv_heads, head_dim=config.head_dim)
        self.tensors = [tensors for _, tensors in layers]  # kept alive: we hold their addresses
        self.layers = (kernels.abi().Layer * len(layers))()
        for layer, (linears, tensors) in zip(self.layers, layers):
            norm_attn, norm_mlp, *packed = tensors
            layer.norm_attn, layer.norm_mlp = norm_attn.data_ptr(), norm_mlp.data_ptr()
            for i, (la, p) in enumerate(zip(linears, packed)):
                layer.weights[i] = kernels.matrix(la.fmt, p, la.out_features)
        self.workspace = kernels.DecodeWorkspace()
        self.lock = threading.Lock()  # one workspace: one step at a time

    @classmethod
    def of(cls, model: torch.nn.Module) -> CpuDecoder | None:
        """The decoder for `model`, or None when its layers do not fit the compiled path.
        Kept on the model while the modules and tensors it was built from are still in
        place (a check of dictionary entries, ~40 µs at 7B), else built again."""
        cached = getattr(model, "_cpu_decoder", None)
        if cached is not None and all(d.get(key) is obj for d, key, obj in cached[0]):
            return cached[1]
        links: list[tuple[dict, str, object]] = []
        layers = _layers(model, links)
        decoder = cls(model.config, layers) if layers else None
        model._cpu_decoder = (links, decoder)
        return decoder

    @classmethod
    def for_step(cls, model: torch.nn.Module, x: torch.Tensor, caches: Sequence[KVCache]) -> CpuDecoder | None:
        """The decoder for this step of `model` (x: the new tokens' embeddings), or None
        unless it is one token of one sequence in float32 on a CPU, without autograd, and
        the model fits the compiled path."""
        fits = (
            x.shape[:2] == (1, 1)
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and len(caches) == 1
            and caches[0].k.dtype == torch.float32
            and caches[0].k.device.type == "cpu"
            and caches[0].k.shape[1] == 1  # a cache of one sequence
            and caches[0].k.is_contiguous()
            and caches[0].v.is_contiguous()
            and not (torch.is_grad_enabled() and x.requires_grad)
            and kernels.impl_name() != "torch"
        )
        return cls.of(model) if fits else None

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
            plan: AttentionPlan) -> torch.Tensor:
        """All layers for x [1, 1, hidden], the new token's embedding (cos/sin: its RoPE
        values, [1, 1, 1, head_dim]): the hidden state after the last layer."""
        x = x.contiguous().clone()  # updated in place, layer by layer
        cos, sin = cos.contiguous(), sin.contiguous()
        mask = None if plan.mask is None else plan.mask.contiguous()
        args = kernels.DecodeArgs(
            layers=ctypes.addressof(self.layers), x=x.data_ptr(), cache_k=cache.k.data_ptr(),
            cache_v=cache.v.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(),
            mask=None if mask is None else mask.data_ptr(), capacity=cache.capacity, slot=int(plan.slots[0]),
            n_keys=plan.n_keys, eps=self.eps, **self.shape)
        with self.lock:
            for i in range(len(self.layers)):
                args.layer = i
                kernels.decode_layer(self.workspace, args)
        return x


def _layers(model: torch.nn.Module, links: list[tuple[dict, str, object]]):
    """Per layer: its linear layers (in the compiled layer's order) and its tensors (the two
    norms' weights, then the packed weights), if every linear layer is quantized and every
    norm is float32, all on the CPU; else None. `links` receives each (dictionary, key, object)
    on the way from the model to them."""

    def child(module: torch.nn.Module, path: str):
        *parents, name = path.split(".")
        for part in parents:
            links.append((module._modules, part, module := module._modules[part]))
        for store in (module._modules, module._parameters, module._buffers):
            if name in store:
                links.append((store, name, store[name]))
                return store[name]
        raise AttributeError(path)

    layers = []
    paths = _weight_paths()
    for i in range(len(child(model, "layers"))):
        block = child(model.layers, str(i))
        linears = [child(block, name) for name in paths]
        norms = [child(block, name) for name in _NORMS]
        if not all(isinstance(la, QuantizedLinear) for la in linears):
            return None
        packed = [child(la, "packed") for la in linears]
        if any(t.device.type != "cpu" for t in packed) or any(
            n.dtype != torch.float32 or n.device.type != "cpu" or not n.is_contiguous() for n in norms
        ):
            return None
        layers.append((linears, [*norms, *packed]))
    return layers
