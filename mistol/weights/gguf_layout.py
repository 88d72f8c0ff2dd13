"""How llama.cpp lays out llama- and qwen2-architecture models: tensor names and the q/k row order.

llama.cpp names tensors `token_embd`, `blk.N.attn_q`, ... where Hugging Face (and mistol)
say `embed_tokens`, `layers.N.self_attn.q_proj`, .... Its converter (convert_hf_to_gguf.py)
also reorders the rows of every q and k projection: within each head, Hugging Face's
"rotate half" RoPE pairs row j with row j + head_dim/2, while ggml's RoPE kernel pairs
neighbouring rows 2j and 2j + 1, so the converter interleaves the two halves:

    gguf = hf.reshape(n_heads, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)

The permutation moves whole rows, so it applies to quantized rows of blocks unchanged, and to
the q/k biases alike. Only the llama architecture is permuted: llama.cpp runs qwen2 with the
"rotate half" (NEOX) RoPE, so its converter keeps Hugging Face's rows.

Llama 3.1's RoPE scaling travels as a tensor, `rope_freqs.weight` (a divisor per frequency),
which is part of the config rather than a weight (`CONFIG_TENSORS`).
"""

from __future__ import annotations

import re

import torch

from ..model import ModelConfig

ARCHITECTURE = "llama"
ARCHITECTURES = ("llama", "qwen2")  # the GGUF `general.architecture` values mistol runs
CONFIG_TENSORS = ("rope_freqs.weight",)

_GLOBAL = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_PER_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_bias": "attn_q.bias",
    "self_attn.k_bias": "attn_k.bias",
    "self_attn.v_bias": "attn_v.bias",
    "self_attn.o_bias": "attn_output.bias",
}
_GLOBAL_BACK = {g: h for h, g in _GLOBAL.items()}
_PER_LAYER_BACK = {g: h for h, g in _PER_LAYER.items()}
_LAYER = re.compile(r"^(layers|blk)\.(\d+)\.(.+)$")


def gguf_name(key: str) -> str | None:
    """Our parameter name ("layers.0.self_attn.q_proj.weight") -> llama.cpp's ("blk.0.attn_q.weight")."""
    if key in _GLOBAL:
        return _GLOBAL[key]
    m = _LAYER.match(key)
    if m and m.group(1) == "layers" and m.group(3) in _PER_LAYER:
        return f"blk.{m.group(2)}.{_PER_LAYER[m.group(3)]}"
    return None


def model_name(name: str) -> str | None:
    """llama.cpp's tensor name -> our parameter name (None: not one of a llama model's)."""
    if name in _GLOBAL_BACK:
        return _GLOBAL_BACK[name]
    m = _LAYER.match(name)
    if m and m.group(1) == "blk" and m.group(3) in _PER_LAYER_BACK:
        return f"layers.{m.group(2)}.{_PER_LAYER_BACK[m.group(3)]}"
    return None


def architecture_of(config: ModelConfig) -> str:
    """The llama.cpp architecture a model is written as: Qwen2's shape (biases on q, k and v
    only) is "qwen2", every other model "llama" (whose loader takes all four biases)."""
    return "qwen2" if config.qkv_bias and not config.o_bias else ARCHITECTURE


def rope_heads(key: str, config: ModelConfig, architecture: str = ARCHITECTURE) -> int | None:
    """How many heads the rows of `key` hold, for the q/k weights and biases llama.cpp
    reorders in a file of `architecture`; else None."""
    if architecture != ARCHITECTURE:
        return None
    if key.endswith(("self_attn.q_proj.weight", "self_attn.q_bias")):
        return config.num_heads
    if key.endswith(("self_attn.k_proj.weight", "self_attn.k_bias")):
        return config.num_kv_heads
    return None


def to_gguf_rows(rows: int, heads: int) -> torch.Tensor:
    """Row indices `order` with gguf_weight = hf_weight[order]."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, 2, half).transpose(1, 2).reshape(-1)


def from_gguf_rows(rows: int, heads: int) -> torch.Tensor:
    """Row indices `order` with hf_weight = gguf_weight[order] (the inverse of `to_gguf_rows`)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(-1)
