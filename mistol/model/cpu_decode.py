"""Decode steps on a CPU with quantized weights (int8, int4 or GGUF blocks, mixed freely):
each decoder layer as one call into the compiled kernels (csrc/mistol_decode.c), for a few
consecutive tokens of one sequence (`run`: a step, a verify pass, a short prompt) or the
next token of each of several sequences (`run_sessions`: a server's batch), its arguments
one struct (`kernels.abi.DecodeArgs`) and its scratch a workspace kept with the decoder.

The same layer in PyTorch is some 25 small operations besides its four matrix products,
each costing ~10 µs of dispatch on a CPU: a tenth of a 7B int4 step. The compiled layer
does the same float32 arithmetic in one parallel region. When a step takes this path is
the execution plan's decision (model/backend.py).
"""

from __future__ import annotations

import ctypes
import threading

import torch

from .. import kernels
from .kv_cache import Q8_0, AttentionPlan, KVCache

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # where each matrix sits in a layer
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def _weight_paths() -> list[str]:
    """The module paths of a layer's matrices, in the order the compiled layer takes them."""
    return [f"{_PARENT[name]}.{name}" for name in kernels.abi().decode_weights]


class CpuDecoder:
    """A model's layers, ready for `mistol_decode_layer`."""

    def __init__(self, config, layers: list[tuple[list[torch.nn.Module], list[torch.Tensor], list]]):
        self.eps = float(config.rms_norm_eps)
        self.shape = dict(hidden=config.hidden_size, ffn=config.intermediate_size, heads=config.num_heads,
                          kv_heads=config.num_kv_heads, head_dim=config.head_dim)
        self.tensors = [(tensors, biases) for _, tensors, biases in layers]  # kept alive: we hold their addresses
        self.formats = sorted({la.fmt for linears, _, _ in layers for la in linears})  # the matrices' formats
        self.layers = (kernels.abi().Layer * len(layers))()
        for layer, (linears, tensors, (qkv_bias, o_bias)) in zip(self.layers, layers):
            norm_attn, norm_mlp, *packed = tensors
            layer.norm_attn, layer.norm_mlp = norm_attn.data_ptr(), norm_mlp.data_ptr()
            layer.qkv_bias = None if qkv_bias is None else qkv_bias.data_ptr()
            layer.o_bias = None if o_bias is None else o_bias.data_ptr()
            for i, (la, p) in enumerate(zip(linears, packed)):
                layer.weights[i] = kernels.matrix(la.fmt, p, la.out_features)
        self.workspace = kernels.DecodeWorkspace()
        self.lock = threading.Lock()  # one workspace: one step at a time

    @classmethod
    def of(cls, model: torch.nn.Module) -> CpuDecoder | None:
        """The decoder for `model`'s layers as they are now, or None when they do not fit
        the compiled path. It holds the tensors' addresses (and the tensors, to keep them
        alive): make a new one when the model's modules change or move."""
        try:
            paths = _weight_paths()
        except RuntimeError:  # the compiled kernels did not load
            return None
        layers = _layers(model, paths)
        return cls(model.config, layers) if layers else None

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
            plan: AttentionPlan) -> torch.Tensor:
        """All layers for x [1, L, hidden], the embeddings of L new consecutive tokens (cos/sin:
        their RoPE values, [1, 1, L, head_dim]): the hidden states after the last layer. Each
        token comes out with the bits it gets decoded alone (csrc/mistol_decode.c)."""
        x = x.contiguous().clone()  # updated in place, layer by layer
        cos, sin = cos.contiguous(), sin.contiguous()
        mask = None if plan.mask is None else plan.mask.contiguous()
        scales = [None if t is None else t.data_ptr() for t in (cache.k_scale, cache.v_scale)]
        args = kernels.DecodeArgs(
            layers=ctypes.addressof(self.layers), x=x.data_ptr(), cache_k=cache.k.data_ptr(),
            cache_v=cache.v.data_ptr(), cache_k_scale=scales[0], cache_v_scale=scales[1], cos=cos.data_ptr(),
            sin=sin.data_ptr(), mask=None if mask is None else mask.data_ptr(), capacity=cache.capacity,
            slot=int(plan.slots[0]), n_keys=plan.n_keys, eps=self.eps, cache_type=cache_type(cache), rows=x.shape[1],
            **self.shape)
        return self._layers_on(x, args)

    def run_sessions(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache],
                     plans: list[AttentionPlan]) -> torch.Tensor:
        """All layers for x [B, 1, hidden], the next token of each of B sequences (caches[b]
        and plans[b] its cache and its attention plan; cos/sin [B, 1, 1, head_dim]): the
        hidden states after the last layer, each the bits of that sequence's step alone."""
        x = x.contiguous().clone()
        cos, sin = cos.contiguous(), sin.contiguous()
        masks = [None if plan.mask is None else plan.mask.contiguous() for plan in plans]  # (kept alive)
        rows = (kernels.KvRow * len(caches))()
        for row, cache, plan, mask in zip(rows, caches, plans, masks):
            row.k, row.v = cache.k.data_ptr(), cache.v.data_ptr()
            row.k_scale, row.v_scale = (None if t is None else t.data_ptr() for t in (cache.k_scale, cache.v_scale))
            row.mask = None if mask is None else mask.data_ptr()
            row.capacity, row.slot, row.n_keys = cache.capacity, int(plan.slots[0]), plan.n_keys
        args = kernels.DecodeArgs(
            layers=ctypes.addressof(self.layers), x=x.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(),
            eps=self.eps, cache_type=cache_type(caches[0]), rows=len(caches), kv_rows=ctypes.addressof(rows),
            **self.shape)
        return self._layers_on(x, args)

    def _layers_on(self, x: torch.Tensor, args) -> torch.Tensor:
        with self.lock:
            for i in range(len(self.layers)):
                args.layer = i
                kernels.decode_layer(self.workspace, args)
        return x


def cache_type(cache: KVCache) -> int:
    """The compiled layer's id of what `cache` holds (mistol_abi.h's KV_F32, KV_F16, KV_Q8_0)."""
    name = Q8_0 if cache.dtype == Q8_0 else {torch.float32: "f32", torch.float16: "f16"}[cache.k.dtype]
    return kernels.abi().kv_caches[name]


def _layers(model: torch.nn.Module, paths: list[str]):
    """Per layer: its linear layers (in the compiled layer's order), its tensors (the two
    norms' weights, then the packed weights) and its attention's biases (q|k|v side by side,
    and o; each None when absent), if every linear layer is quantized and every norm and bias
    is float32, all on the CPU; else None."""
    layers = []
    for block in model.layers:
        linears = [block.get_submodule(name) for name in paths]
        norms = [block.get_parameter(name) for name in _NORMS]
        packed = [_packed_weight(la) for la in linears]
        qkv_bias, o_bias = block.self_attn.qkv_bias(), block.self_attn.o_bias
        floats = [t for t in (*norms, qkv_bias, o_bias) if t is not None]
        if any(p is None or p.device.type != "cpu" for p in packed) or any(
            t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in floats
        ):
            return None
        layers.append((linears, [*norms, *packed], (qkv_bias, o_bias)))
    return layers


def _packed_weight(layer: torch.nn.Module) -> torch.Tensor | None:
    """The weight of a quantized layer as the kernels take it (a `QuantizedLinear`'s packed
    int8/int4, or a `BlockLinear`'s GGUF blocks: its `fmt` and `packed` buffer), or None for
    any other layer."""
    packed = getattr(layer, "packed", None)
    return packed if packed is not None and isinstance(getattr(layer, "fmt", None), str) else None
