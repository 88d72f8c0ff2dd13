"""Reading a GGUF file (llama.cpp's format): its metadata, its model config, its tensors.

A GGUF file is a header of typed key/value metadata (`llama.block_count`,
`tokenizer.ggml.tokens`, ...) and tensor descriptions, then the tensor data, aligned.
`gguf_header.read_header` maps the file (copy-on-write, so tensors can be used in place and
the file is never modified) and parses the header; this module turns that into a
`ModelConfig` and our parameter names, with a one-line `MistolError` for anything we
cannot run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MistolError
from ..model import ModelConfig
from .gguf_layout import ARCHITECTURES

_MAGIC = b"GGUF"
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")  # a decoder block's tensors: blk.N.*


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise MistolError(f"{self.path}: cannot read ({e.strerror or e})") from None
        if magic != _MAGIC:
            raise MistolError(f"{self.path}: not a GGUF file (it does not start with the bytes 'GGUF')")
        from .gguf_header import HeaderError, read_header

        try:
            header = read_header(self.path)
        except OSError as e:
            raise MistolError(f"{self.path}: cannot read ({e.strerror or e})") from None
        except HeaderError as e:
            raise MistolError(f"{self.path}: truncated or corrupt GGUF file ({e})") from None
        self._metadata = header.metadata
        self.tensors = {t.name: t for t in header.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (int, float, bool, str, or a list of them), or `default`."""
        value = self._metadata.get(key)
        if value is None:
            return default
        try:
            return _plain(value)
        except UnicodeDecodeError as e:
            raise MistolError(f"{self.path}: metadata {key!r} cannot be read ({e})") from None

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise MistolError(f"{self.path}: missing metadata {key!r}")
        return value

    @property
    def architecture(self) -> str | None:
        return self.get("general.architecture")

    def config(self) -> ModelConfig:
        arch = self.architecture
        if arch not in ARCHITECTURES:
            raise MistolError(
                f"{self.path}: unsupported architecture {arch!r}; mistol runs llama-architecture "
                "(Mistral, Llama) and qwen2-architecture GGUF files"
            )
        if self.get(f"{arch}.expert_count", 0):
            raise MistolError(f"{self.path}: mixture-of-experts models (Mixtral) are not supported")

        def number(key: str, default=None, kind=int):
            value = self.get(f"{arch}.{key}", default)
            if value is None:
                raise MistolError(f"{self.path}: missing metadata '{arch}.{key}'")
            if isinstance(value, list):
                raise MistolError(f"{self.path}: per-layer '{arch}.{key}' is not supported")
            if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
                raise MistolError(f"{self.path}: metadata '{arch}.{key}' is {value!r}; expected a number")
            if kind is float:  # stored as float32: the shortest decimal that rounds to it (1e-05)
                return float(str(np.float32(value)))
            return kind(value)

        hidden = number("embedding_length")
        heads = number("attention.head_count")
        if hidden <= 0 or heads <= 0:
            raise MistolError(f"{self.path}: embedding_length {hidden} and head_count {heads} must be positive")
        if self.get(f"{arch}.attention.key_length") is None and hidden % heads:
            raise MistolError(f"{self.path}: embedding_length {hidden} is not a multiple of head_count {heads}")
        head_dim = number("attention.key_length", hidden // heads)
        if number("attention.value_length", head_dim) != head_dim:
            raise MistolError(f"{self.path}: attention.value_length differs from key_length; not supported")
        rope_dim = number("rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise MistolError(
                f"{self.path}: RoPE over {rope_dim} of {head_dim} head dimensions is not supported"
            )
        scaling = self.get(f"{arch}.rope.scaling.type", "none")
        factor = 1.0
        if scaling == "linear":
            factor = number("rope.scaling.factor", kind=float)
        elif scaling != "none":
            raise MistolError(f"{self.path}: rope.scaling.type {scaling!r} is not supported (supported: none, linear)")
        freq_factors = self._rope_freq_factors(head_dim)
        window = self.get(f"{arch}.attention.sliding_window")

        # Checked before a model of that many blocks is built to load into (4 billion took
        # minutes and gigabytes before failing)
        blocks, held = number("block_count"), {int(m.group(1)) for t in self.tensors if (m := _BLOCK_TENSOR.match(t))}
        if blocks > len(held):
            raise MistolError(f"{self.path}: block_count is {blocks}, but the file holds the tensors of {len(held)} blocks")
        embedding = self.tensors.get("token_embd.weight")
        if embedding is None or len(embedding.shape) != 2:
            raise MistolError(f"{self.path}: no token_embd.weight tensor of 2 dimensions")
        return ModelConfig(
            vocab_size=int(embedding.shape[1]),
            hidden_size=hidden,
            intermediate_size=number("feed_forward_length"),
            num_layers=blocks,
            num_heads=heads,
            num_kv_heads=number("attention.head_count_kv", heads),
            head_dim=head_dim,
            rope_theta=number("rope.freq_base", 10000.0, float),
            rope_scaling_factor=factor,
            rope_freq_factors=freq_factors,
            qkv_bias="blk.0.attn_q.bias" in self.tensors,
            o_bias="blk.0.attn_output.bias" in self.tensors,
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5, float),
            sliding_window=int(window) if window else None,
            max_position_embeddings=number("context_length", 4096),
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=self.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.get("tokenizer.ggml.eos_token_id"),
        )

    def _rope_freq_factors(self, head_dim: int) -> tuple[float, ...] | None:
        """The divisors of the RoPE frequencies that llama.cpp's converter writes for Llama 3.1's
        scaling (`rope_freqs.weight`, one F32 per pair of head dimensions), or None."""
        tensor = self.tensors.get("rope_freqs.weight")
        if tensor is None:
            return None
        if tensor.tensor_type.name != "F32" or [int(d) for d in tensor.shape] != [head_dim // 2]:
            raise MistolError(
                f"{self.path}: rope_freqs.weight should be F32 of shape [{head_dim // 2}], "
                f"found {tensor.tensor_type.name} {[int(d) for d in tensor.shape]}"
            )
        return tuple(float(v) for v in np.asarray(tensor.data, dtype=np.float32))


def _plain(value: Any) -> Any:
    """A parsed metadata value as Python values: bytes decoded, arrays as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
