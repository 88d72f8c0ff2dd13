"""Loading a GGUF file's weights into a `Transformer`, one tensor at a time.

What each tensor type becomes:

- F32 / F16 / BF16: floats in the requested dtype (an F32 tensor loaded as f32 stays a
  view of the mapped file); linear layers are quantized as they load with `quant`, as
  `load_model` does for a checkpoint directory.
- Q8_0 and Q4_0 linear layers: `QuantizedLinear` int8 / int4 straight from the file's
  bytes, which are already our kernels' blocks. A Q4_0 file stays Q4_0 with
  `quant="int8"` (upconverting would cost memory and gain nothing); a Q8_0 file becomes
  int4 with `quant="int4"`.
- Q4_K, Q5_K, Q6_K, Q4_1, Q5_0, Q5_1 linear layers on a CPU with the compiled kernels:
  `BlockLinear` over the file's own blocks (a view of the mapped file: no conversion and
  no copy, but for q/k rows that need reordering), whatever `quant` says.
- Other block types (Q2_K, Q3_K), and the above elsewhere: see `convert_format`.
- The norms are floats in the requested dtype, and so is the token embedding, but for an
  embedding of one of the block types above (Q8_0 and Q4_0 included) on a CPU with the
  compiled kernels, which stays blocks (`BlockEmbedding`: rows decoded as tokens are looked
  up; a tied head multiplies the file's values, on the kernels' layout).

q and k rows are put back from llama.cpp's RoPE order (`gguf_layout`) as they are read,
for quantized rows as well.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..block_quant import EMBEDDING_FORMATS, ROW_FORMATS, BlockEmbedding, BlockLinear
from ..errors import MistolError
from ..model import Transformer
from ..model.linear import TiledLinear, tiles_pay_off
from ..quant import GGML_TYPES, QuantizedLinear, quantize_rows
from .checkpoint import QUANT_FORMATS, bar_disabled, set_linear, set_parameter, to_target
from .gguf_file import GGUFFile
from .gguf_layout import CONFIG_TENSORS, from_gguf_rows, model_name, rope_heads
from .memory import release_pages

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CONVERTED_TYPES = ("Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_SLAB = 1 << 21  # values dequantized or converted at a time


def convert_format(ggml_type: str, quant: str | None, native: bool = False) -> str | None:
    """What a linear layer of `ggml_type` becomes: "int8", "int4", a block type of
    `mistol.block_quant.ROW_FORMATS` kept as it is, or None (floats). `native`: the
    compiled kernels run on the target device (a CPU), so those block types stay.

    Block types our kernels do not run (Q2_K and Q3_K; with `native` False also Q4_1,
    Q5_0/Q5_1 and Q4_K..Q6_K) are dequantized a slab of
    rows at a time and requantized to int8 (Q8_0), or to int4 (Q4_0) with `quant="int4"`.
    int8 is the default because it adds almost nothing to the source's own error: its step
    is 1/127 of each block of 32's largest value, where a 4-bit source's step is about 1/15
    of its sub-block's range and a 6-bit one's 1/63, so the model computes nearly what it
    computes in llama.cpp, at about twice a 4-bit file's memory. int4 would round a second
    time at the source's own coarseness.
    """
    if ggml_type in FLOAT_TYPES:
        return quant
    if ggml_type == "Q4_0":
        return "int4"
    if native and ggml_type in ROW_FORMATS:
        return ggml_type
    return "int4" if quant == "int4" else "int8"


def load_gguf(
    gf: GGUFFile,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    quant: str | None = None,
) -> Transformer:
    """Build a `Transformer` from a GGUF file (see the module docstring for each type)."""
    if quant is not None and quant not in QUANT_FORMATS:
        raise MistolError(f"unknown quantization {quant!r} (choose from {', '.join(QUANT_FORMATS)})")
    config = gf.config()
    model = Transformer(config, device="meta")
    device = torch.device(device)
    plan = _plan(gf, model)
    native = device.type == "cpu" and kernels.available()

    from tqdm import tqdm

    total = sum(t.n_bytes for t, _ in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights", disable=bar_disabled(progress)) as bar:
        for tensor, key in plan:
            heads = rope_heads(key, config, gf.architecture)
            src = _Rows(tensor, from_gguf_rows(tensor.data.shape[0], heads) if heads else None)
            fmt = convert_format(src.type, quant, native) if _is_linear(key, tensor) else None
            if key == "embed_tokens.weight" and native and src.type in EMBEDDING_FORMATS:
                embedding = BlockEmbedding(*src.shape, src.type, _file_rows(src), dtype, tied=config.tie_word_embeddings)
                model.embed_tokens = embedding
                if embedding.head_is_a_copy:
                    release_pages(torch.from_numpy(tensor.data))
            elif fmt is None and _is_linear(key, tensor) and tiles_pay_off(src.shape, device):
                release = release_pages if src.order is None else None  # (values: views of the mapped file)
                set_linear(model, key, TiledLinear.from_rows(src.values, *src.shape, dtype, release=release))
            elif fmt is None:
                set_parameter(model, key, _floats(src, dtype, device))
            elif fmt in ROW_FORMATS:  # the file's blocks (copied where reordered or repacked)
                layer = BlockLinear.for_kernels(src.shape[1], src.shape[0], fmt, _file_rows(src))
                set_linear(model, key, layer)
                if src.order is not None or layer.fmt != fmt:
                    release_pages(torch.from_numpy(tensor.data))
            else:
                set_linear(model, key, _quantized(src, key, fmt).to(device))
                release_pages(torch.from_numpy(tensor.data))
            bar.update(tensor.n_bytes)
    model.rotary.to(device)
    return model.eval().requires_grad_(False)


def float_bytes(gf: GGUFFile, quant: str | None) -> int:
    """What the tensors that load as floats take in f32 (to choose a dtype that fits)."""
    return sum(
        4 * t.n_elements
        for t in gf.tensors.values()
        if not _is_linear(model_name(t.name), t) or convert_format(t.tensor_type.name, quant) is None
    )


def _plan(gf: GGUFFile, model: Transformer) -> list:
    """(tensor, our parameter name) for each tensor, every check made before any loading."""
    expected = {k: tuple(p.shape) for k, p in model.named_parameters()}
    plan = []
    for tensor in gf.tensors.values():
        if tensor.name in CONFIG_TENSORS:
            continue  # read into the config
        key = model_name(tensor.name)
        if key not in expected:
            raise MistolError(
                f"{gf.path}: unexpected tensor {tensor.name!r} for a {gf.architecture}-architecture model"
            )
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        if shape != expected[key]:
            raise MistolError(
                f"{gf.path}: tensor {tensor.name!r} has shape {list(shape)}, the metadata implies {list(expected[key])}"
            )
        kind = tensor.tensor_type.name
        if kind not in FLOAT_TYPES and kind not in GGML_TYPES and kind not in CONVERTED_TYPES:
            raise MistolError(
                f"{gf.path}: tensor {tensor.name!r} has type {kind}, which mistol does not read "
                f"(it reads {', '.join([*FLOAT_TYPES, *GGML_TYPES, *CONVERTED_TYPES])})"
            )
        plan.append((tensor, key))
    found = {key for _, key in plan}
    missing = [key for key in expected if key not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise MistolError(f"{gf.path}: the file is missing {len(missing)} tensor(s): {shown}")
    return plan


def _is_linear(key: str | None, tensor) -> bool:
    # Every 2-D weight of the model but the embedding is a linear layer's.
    return key is not None and key != "embed_tokens.weight" and len(tensor.shape) == 2


class _Rows:
    """One GGUF tensor, read in our row order: values or raw blocks, a slab at a time."""

    def __init__(self, tensor, order: torch.Tensor | None):
        self.type = tensor.tensor_type.name  # "Q4_K"
        self._ggml_type = tensor.tensor_type
        self.data = tensor.data  # memory-mapped: values, or each row's blocks as bytes
        self.order = order.numpy() if order is not None else None
        self.shape = tuple(int(d) for d in reversed(tensor.shape))

    def raw(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        return self.data[r0:r1] if self.order is None else self.data[self.order[r0:r1]]

    def values(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        raw = self.raw(r0, r1)
        if self.type == "BF16":  # stored as bytes: numpy has no bfloat16
            return torch.from_numpy(raw).view(torch.bfloat16)
        if self.type in FLOAT_TYPES:
            return torch.from_numpy(raw)
        from gguf.quants import dequantize

        values = torch.from_numpy(dequantize(raw, self._ggml_type))
        if self.order is None:  # rows of the mapped file, read for the last time
            release_pages(torch.from_numpy(raw))
        return values


def _file_rows(src: _Rows) -> torch.Tensor:
    """A block tensor's rows in our order, uint8 [rows, bytes per row]: a view of the mapped
    file (a copy where rows are reordered)."""
    return torch.from_numpy(src.raw()).view(src.shape[0], -1)


def _floats(src: _Rows, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if src.type in FLOAT_TYPES and src.order is None:
        return to_target(src.values(), dtype, device)  # no copy when already in dtype (but small ones)
    out = torch.empty(src.shape, dtype=dtype, device=device)
    step = max(1, _SLAB // src.shape[-1])
    for r0 in range(0, src.shape[0], step):
        out[r0 : r0 + step] = src.values(r0, r0 + step)
    release_pages(torch.from_numpy(src.data))
    return out


def _quantized(src: _Rows, key: str, fmt: str) -> QuantizedLinear:
    rows, cols = src.shape
    if GGML_TYPES.get(src.type) == fmt:
        return QuantizedLinear.from_ggml(torch.from_numpy(src.raw()), fmt, rows, cols)
    # Float rows in file order are views of the mapped file: give each slab's pages back
    # once quantized. (Dequantized or reordered rows are copies, freed anyway.)
    in_place = src.type in FLOAT_TYPES and src.order is None
    return quantize_rows(src.values, rows, cols, fmt, name=key, release=release_pages if in_place else None)
