"""The Mistral/Llama/Qwen2 decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Module and parameter names follow Hugging Face's `MistralForCausalLM` (without its
`model.` prefix), so a checkpoint's tensors map onto this model by name alone; the one
exception is the attention's biases (`q_bias` for `q_proj.bias`...), kept out of the linear
layers so that every kind of linear layer (float, tiled, quantized) stays bias-free.
Numerics follow the reference too: RMSNorm in float32, RoPE angles in float32, the
"rotate half" (non-interleaved) RoPE layout.

A plain PyTorch model: which code runs a step (fused C layers, CUDA graphs, which kernel
a product uses) is the execution plan's business (model/backend.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import AttentionPlan, KVCache
from .linear import Linear, linear, linear_each, linear_many


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, the same arithmetic
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """The RoPE frequencies [head_dim / 2] (float32), computed as transformers computes them."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if config.rope_llama3 is not None:
        inv_freq = _llama3_frequencies(inv_freq, config.rope_llama3)
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float32)
    return inv_freq / config.rope_scaling_factor


def _llama3_frequencies(inv_freq: torch.Tensor, rope) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths divided by `factor`, short ones kept, a blend between."""
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, L, D]; cos/sin: [B, 1, L, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device=None):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h, q, kv = config.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = Linear(h, q, device)
        self.k_proj = Linear(h, kv, device)
        self.v_proj = Linear(h, kv, device)
        self.o_proj = Linear(q, h, device)
        self.q_bias, self.k_bias, self.v_bias = (_bias(n, config.qkv_bias, device) for n in (q, kv, kv))
        self.o_bias = _bias(h, config.o_bias, device)

    def qkv_bias(self) -> torch.Tensor | None:
        """The q, k and v biases side by side, as the projections' outputs are; or None."""
        return None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))

    def out(self, a: torch.Tensor) -> torch.Tensor:
        y = self.o_proj(a)
        return y if self.o_bias is None else y + self.o_bias

    def forward(self, x, cos, sin, caches: list[KVCache] | None, plans: list[AttentionPlan] | None):
        """Row b of `x` continues the sequence in caches[b]: the projections run batched
        (one read of the weights for all rows), attention runs per row over its own cache.
        Without caches (training), each row is a whole sequence under a causal mask."""
        b, n, _ = x.shape
        hq, hkv, d = self.n_heads, self.n_kv, self.head_dim
        qkv = linear_many(x, (self.q_proj, self.k_proj, self.v_proj))
        if self.q_bias is not None:
            qkv = qkv + self.qkv_bias()
        # RoPE on the queries and keys together: [b, hq + hkv, n, d]
        qk = apply_rope(qkv[..., : (hq + hkv) * d].view(b, n, hq + hkv, d).transpose(1, 2), cos, sin)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[..., (hq + hkv) * d :].view(b, n, hkv, d).transpose(1, 2)
        if caches is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)
            return self.out(out.transpose(1, 2).reshape(b, n, -1))

        outs = []
        for row, (cache, plan) in enumerate(zip(caches, plans)):
            cache.write(self.layer, plan.slots, k[row : row + 1], v[row : row + 1])
            keys, values = cache.read(self.layer, plan.n_keys, q.dtype)
            outs.append(F.scaled_dot_product_attention(
                q[row : row + 1], keys, values, attn_mask=plan.mask, enable_gqa=hq != hkv
            ))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


def _bias(n: int, present: bool, device) -> nn.Parameter | None:
    return nn.Parameter(torch.zeros(n, device=device)) if present else None


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(h, f, device)
        self.up_proj = Linear(h, f, device)
        self.down_proj = Linear(f, h, device)

    def forward(self, x):
        gate, up = linear_each(x, (self.gate_proj, self.up_proj))
        # in place where no gradient needs gate's values: one [rows, ffn] temporary fewer
        return self.down_proj(F.silu(gate, inplace=not torch.is_grad_enabled()).mul_(up))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device=None):
        super().__init__()
        self.self_attn = Attention(config, layer, device)
        self.mlp = FeedForward(config, device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)

    def forward(self, x, cos, sin, caches, plans):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, caches, plans)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        """`device="meta"` builds the shapes without memory, for loading weights into."""
        super().__init__()
        self.config = config
        # An explicit weight skips the random init (on "meta", init would import torch's compiler)
        embedding = torch.empty(config.vocab_size, config.hidden_size, device=device)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(Block(config, i, device) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, device)
        )
        self.rotary = RotaryEmbedding(config)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the embedding's: float, or the dtype blocks decode to)."""
        embed = self.embed_tokens
        return embed.weight.dtype if isinstance(embed, nn.Embedding) else embed.dtype

    @property
    def device(self) -> torch.device:
        embed = self.embed_tokens
        return embed.weight.device if isinstance(embed, nn.Embedding) else embed.device

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        caches: KVCache | Sequence[KVCache],
        all_logits: bool = False,
        plans: Sequence[AttentionPlan] | None = None,
    ) -> torch.Tensor:
        """tokens: [B, L]; row b continues the sequence held by caches[b] at the consecutive
        `positions[b]` ([B, L]; for a single sequence, one cache and positions [L] will do).

        Returns float32 logits: [B, L, vocab] if `all_logits`, else [B, vocab] of the last
        position (the only one decoding needs; the head is the largest matrix of a step).
        """
        if isinstance(caches, KVCache):
            caches = [caches]
        if positions.dim() == 1:
            positions = positions.expand(tokens.shape[0], -1)
        x, cos, sin = self.embed(tokens, positions)
        if plans is None:  # (given by a caller that plans on the device: see cuda_graphs.py)
            plans = [cache.plan(pos) for cache, pos in zip(caches, positions)]
        for block in self.layers:
            x = block(x, cos, sin, caches, plans)
        return self.logits(x, all_logits)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor):
        """The input of the first layer: the tokens' embeddings [B, L, hidden], and their
        RoPE cos/sin [B, 1, L, head_dim] (positions as in `forward`)."""
        if positions.dim() == 1:
            positions = positions.expand(tokens.shape[0], -1)
        x = self.embed_tokens(tokens)
        cos, sin = self.rotary(positions, x.dtype)
        return x, cos[:, None], sin[:, None]  # cos/sin broadcast over heads

    def logits(self, x: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """float32 logits from the last layer's output x [B, L, hidden]: of every position
        with `all_logits`, else of the last one only."""
        x = self.norm(x if all_logits else x[:, -1])
        return self.head(x).float()

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(x)
        if isinstance(self.embed_tokens, nn.Embedding):
            return linear(x, self.embed_tokens.weight)
        return self.embed_tokens.as_linear()(x)  # an embedding kept as GGUF blocks (block_quant)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states of whole sequences [B, L], causal, no cache: for training
        (sequences shorter than any sliding window)."""
        x, cos, sin = self.embed(tokens, torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.layers:
            x = block(x, cos, sin, None, None)
        return self.norm(x)
