"""Model shapes for `mistol bench`, and what one decode step must read at each precision.

Random weights are enough to measure speed: a step costs the same whatever the values, as
long as they are finite. Each engine builds its model directly in the format it runs
(`models.py`), so no float32 copy of a 7B model ever sits in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import MistolError

if TYPE_CHECKING:  # imported where used: the model package imports torch
    from ..model import ModelConfig

# Hugging Face config.json fields, so that transformers, mistol and the GGUF writer share them.
SHAPES: dict[str, dict] = {
    "7b": {  # Mistral 7B v0.1 (OpenHermes 2.5's shape, less its two ChatML tokens)
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 32768, "sliding_window": 4096, "rope_theta": 10000.0,
    },
    "1b": {  # TinyLlama 1.1B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
        "max_position_embeddings": 2048, "rope_theta": 10000.0,
    },
    "0.5b": {  # Qwen2.5 0.5B: a tied head of 136M weights, a third of the model
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "135m": {  # SmolLM2 135M: per-token overheads, not bandwidth, decide its speed
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 0,
    },
    "tiny": {  # for checking the benchmark itself in seconds
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000,
        "max_position_embeddings": 2048, "rope_theta": 10000.0,
    },
}
COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "bos_token_id": 1, "eos_token_id": 2}

# Bytes per weight of a linear layer in each format mistol runs (Q8_0: 34 bytes per 32
# weights, Q4_0: 18), and the GGUF type that stores the same bits for llama.cpp.
BYTES_PER_WEIGHT = {"f32": 4.0, "bf16": 2.0, "f16": 2.0, "int8": 34 / 32, "int4": 18 / 32}
GGUF_TYPES = {"int8": "Q8_0", "int4": "Q4_0", "f16": "F16", "f32": "F32", "bf16": "BF16"}
# The file types `mistol bench --kquants` has llama.cpp's quantizer make, and the bytes a weight
# takes in them (for the room check): llama.cpp's mixes (some tensors kept in a larger type, the
# output in Q6_K), rounded up from its block sizes.
LLAMA_CPP_BYTES_PER_WEIGHT = {"Q4_K_M": 0.63, "Q5_K_M": 0.73, "Q6_K": 0.83, "Q4_K_S": 0.60, "Q5_K_S": 0.70,
                              "Q4_0": 0.60, "Q4_1": 0.66, "Q5_0": 0.72, "Q5_1": 0.78, "Q8_0": 1.10}


def hf_config(shape: str) -> dict:
    if shape not in SHAPES:
        raise MistolError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    return {**COMMON, **SHAPES[shape]}


def model_config(shape: str) -> ModelConfig:
    from ..model import ModelConfig

    return ModelConfig.from_hf_dict(hf_config(shape), source=f"shape {shape}")


def linear_weights(config: ModelConfig) -> int:
    """Weights in the linear layers, the output head included: what decoding reads per token."""
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f
    return config.num_layers * per_layer + config.vocab_size * h


def all_weights(config: ModelConfig) -> int:
    """Every weight the model stores (a tied head is the embedding: stored once)."""
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return linear_weights(config) + embedding + (2 * config.num_layers + 1) * config.hidden_size


def head_format(config: ModelConfig, fmt: str) -> str:
    """The output head's format: a tied head of a quantized model is int8 (Q8_0) in both
    engines (`mistol.quant.quantize_tied_head`; the bench's GGUF stores its embedding so)."""
    return "int8" if config.tie_word_embeddings and fmt in ("int8", "int4") else fmt


def bytes_per_token(config: ModelConfig, fmt: str, context: int, kv_bytes: int = 4) -> float:
    """Bytes one decode step reads at `context` tokens: every linear weight once, one
    embedding row, and the keys and values of the context (its share is small here)."""
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * context * kv_bytes
    head = config.vocab_size * config.hidden_size
    return ((linear_weights(config) - head) * BYTES_PER_WEIGHT[fmt]
            + head * BYTES_PER_WEIGHT[head_format(config, fmt)] + kv)


def synthetic_tokenizer(vocab_size: int):
    """A SentencePiece-style vocabulary of the right size (control tokens, the 256 byte
    pieces, filler words), so that llama.cpp accepts the GGUF; the benchmark feeds ids."""
    from ..tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, Tokenizer

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    pieces += [f"▁w{i}" for i in range(vocab_size - len(pieces))]
    types += [NORMAL] * (vocab_size - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(vocab_size - 259)]
    return Tokenizer(pieces, types, scores=scores, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                     source="synthetic vocabulary")
