"""Writing a llama- or qwen2-architecture GGUF file that llama.cpp loads, tensor by tensor.

The metadata, tensor names, q/k row order (see `gguf_layout`), tensor types and the
tokenizer follow llama.cpp's convert_hf_to_gguf.py for Mistral/Llama/Qwen2 checkpoints: 1-D
tensors (the norms and biases) are always F32, every 2-D weight takes the requested type;
Llama 3.1's RoPE scaling becomes the `rope_freqs` tensor. Q8_0 and Q4_0 blocks come from
`mistol.quant.quantize_ggml`, bit for bit llama.cpp's quantizers.

The header (metadata and every tensor's name, shape, type and offset) follows from the
config alone, so it is written first; then each tensor is written at its offset as the
input iterator yields it, in any order, and nothing is held beyond one tensor. Besides
llama.cpp's keys we write `llama.attention.sliding_window` when the model has one: llama.cpp
ignores it for this architecture, mistol honours it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import MistolError
from ..model import ModelConfig
from ..quant import BLOCK, quantize_ggml
from .checkpoint import bar_disabled, find_weight_files, iter_tensor_sources, model_key
from .gguf_layout import architecture_of, gguf_name, rope_heads, to_gguf_rows

TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
BYTES_PER_32 = {"F32": 128, "F16": 64, "BF16": 64, "Q8_0": 34, "Q4_0": 18}  # bytes per 32 values
_QUANT = {"Q8_0": "int8", "Q4_0": "int4"}
_SLAB = 1 << 21  # values converted and written at a time


@dataclass
class _Slot:
    """Where one tensor goes in the file."""

    name: str  # llama.cpp's
    shape: tuple[int, ...]  # ours: [out, in] or [n]
    ggml_type: str
    offset: int  # from the start of the data section
    heads: int | None  # q/k: heads whose rows llama.cpp reorders

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * BYTES_PER_32[self.ggml_type] // 32


def write_gguf(
    path: str | Path,
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer=None,
    tensor_type: str = "F16",
    embedding_type: str | None = None,
    progress: bool | None = False,
) -> Path:
    """Write a model to `path` as a llama- or qwen2-architecture GGUF file (`architecture_of`).

    `tensors` yields (Hugging Face name, float tensor) pairs, as a checkpoint names them
    ("model.layers.0.self_attn.q_proj.weight"), one at a time, in any order. `tokenizer` is
    a `Tokenizer`, a model directory holding one, or None. `tensor_type` is that of every
    2-D weight ("F32", "F16", "BF16", "Q8_0" or "Q4_0"; a weight whose rows are not whole
    blocks of 32 falls back to F16, as in llama.cpp), `embedding_type` that of the token
    embedding when it should differ.
    """
    from .gguf_package import gguf
    import numpy as np

    from .gguf_vocab import add_vocabulary

    path = Path(path)
    embedding_type = embedding_type or tensor_type
    for t in (tensor_type, embedding_type):
        if t not in TENSOR_TYPES:
            raise MistolError(f"unknown GGUF tensor type {t!r} (choose from {', '.join(TENSOR_TYPES)})")
    if isinstance(tokenizer, (str, Path)):
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(tokenizer)

    slots = _layout(config, tensor_type, embedding_type)
    writer = gguf.GGUFWriter(path, architecture_of(config))
    _add_config(writer, config, tensor_type)
    if tokenizer is not None:
        add_vocabulary(writer, tokenizer, config.vocab_size)
    for slot in slots.values():
        # numpy's float32 with raw_dtype: the shape is taken as values, not bytes
        writer.add_tensor_info(slot.name, slot.shape, np.float32, slot.nbytes, gguf.GGMLQuantizationType[slot.ggml_type])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    finally:
        writer.close()
    data_start = _align(path.stat().st_size)
    end = max(s.offset + _align(s.nbytes) for s in slots.values())
    total = sum(s.nbytes for s in slots.values())
    from tqdm import tqdm

    try:
        with open(path, "r+b") as f, tqdm(total=total, unit="B", unit_scale=True, desc="Writing GGUF",
                                          disable=bar_disabled(progress)) as bar:
            f.truncate(data_start + end)  # the padding between tensors reads as zeros
            if ROPE_FREQS in slots:
                tensors = itertools.chain([(ROPE_FREQS, rope_freq_factors(config))], tensors)
            for hf_name, tensor in tensors:
                key = ROPE_FREQS if hf_name == ROPE_FREQS else model_key(hf_name)
                if key is None or (key == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                slot = slots.pop(key, None)
                if slot is None:
                    raise MistolError(f"write_gguf: unexpected or repeated tensor {hf_name!r} for this config")
                if tuple(tensor.shape) != slot.shape:
                    raise MistolError(
                        f"write_gguf: tensor {hf_name!r} has shape {list(tensor.shape)}, the config implies {list(slot.shape)}"
                    )
                f.seek(data_start + slot.offset)
                _write_tensor(f, tensor, slot)
                bar.update(slot.nbytes)
        if slots:
            missing = list(slots)
            shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
            raise MistolError(f"write_gguf: {len(missing)} tensor(s) were not given: {shown}")
    except BaseException:
        path.unlink(missing_ok=True)  # never leave a file that looks whole but is not
        raise
    return path


def export_checkpoint(model_dir: str | Path, path: str | Path, tensor_type: str = "F16", **kwargs) -> Path:
    """Convert a Hugging Face model directory (with its tokenizer, if it has one) to GGUF."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_file(model_dir / "config.json")
    sources = iter_tensor_sources(find_weight_files(model_dir))
    tokenizer = model_dir if (model_dir / "tokenizer.model").is_file() else None
    return write_gguf(path, config, ((s.name, s.read()) for s in sources), tokenizer, tensor_type, **kwargs)


def _layout(config: ModelConfig, tensor_type: str, embedding_type: str) -> dict[str, _Slot]:
    """Every tensor of the model, by our parameter name, in llama.cpp's order, with its place."""
    from ..model import Transformer

    slots: dict[str, _Slot] = {}
    offset = 0
    shapes = {k: tuple(p.shape) for k, p in Transformer(config, device="meta").named_parameters()}
    order = ["embed_tokens.weight"] + [k for k in shapes if k.startswith("layers.")] + ["norm.weight", "lm_head.weight"]
    for key in order:
        if key not in shapes:
            continue  # lm_head with tied embeddings
        shape = shapes[key]
        ggml_type = "F32" if len(shape) == 1 else embedding_type if key == "embed_tokens.weight" else tensor_type
        if ggml_type in _QUANT and shape[-1] % BLOCK:
            ggml_type = "F16"
        slot = _Slot(gguf_name(key), shape, ggml_type, offset, rope_heads(key, config, architecture_of(config)))
        slots[key] = slot
        offset += _align(slot.nbytes)
    if config.rope_llama3 is not None or config.rope_freq_factors is not None:
        # Llama 3.1's RoPE scaling, as llama.cpp's converter writes it (see `rope_freq_factors`)
        slots[ROPE_FREQS] = _Slot(ROPE_FREQS, (config.head_dim // 2,), "F32", offset, None)
    return slots


ROPE_FREQS = "rope_freqs.weight"


def rope_freq_factors(config: ModelConfig) -> torch.Tensor:
    """The divisor of each RoPE frequency that gives the config's scaled frequencies."""
    from ..model.transformer import rope_frequencies

    plain = rope_frequencies(replace(config, rope_llama3=None, rope_freq_factors=None, rope_scaling_factor=1.0))
    return plain / rope_frequencies(replace(config, rope_scaling_factor=1.0))


def _add_config(writer, config: ModelConfig, tensor_type: str) -> None:
    from .gguf_package import gguf

    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.head_dim != config.hidden_size // config.num_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    file_type = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0"}
    writer.add_file_type(gguf.LlamaFileType[file_type[tensor_type]])
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    if config.rope_scaling_factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling_factor)
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tensor(f, tensor: torch.Tensor, slot: _Slot) -> None:
    t = tensor.detach().cpu()
    if slot.heads is not None:
        t = t[to_gguf_rows(t.shape[0], slot.heads)]
    if t.dim() == 1:
        _encode(t, slot.ggml_type).tofile(f)
        return
    step = max(1, _SLAB // t.shape[1])
    for r0 in range(0, t.shape[0], step):
        _encode(t[r0 : r0 + step], slot.ggml_type).tofile(f)


def _encode(t: torch.Tensor, ggml_type: str):
    """Values -> the numpy array of their bytes in the file."""
    if ggml_type in _QUANT:
        return quantize_ggml(t, _QUANT[ggml_type]).numpy()
    if ggml_type == "BF16":  # numpy has no bfloat16: write its bits
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return t.to(torch.float32 if ggml_type == "F32" else torch.float16).contiguous().numpy()


def _align(n: int, alignment: int = 32) -> int:
    """GGUF aligns each tensor's data to 32 bytes (its default `general.alignment`)."""
    return -(-n // alignment) * alignment
