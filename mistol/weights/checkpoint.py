"""Loading a Hugging Face model directory into a `Transformer`.

Accepted layouts: `model.safetensors`; sharded `model-0000x-of-0000y.safetensors` with
`model.safetensors.index.json`; `pytorch_model.bin`; sharded `pytorch_model-*.bin` with
`pytorch_model.bin.index.json`. Every file is memory-mapped; tensors already in the
target dtype are used in place, the others are converted one at a time and their mapped
pages released, so peak memory stays near the size of the loaded weights. (On a CPU, linear
weights with rows longer than 4096 inputs are copied into tiles, `TiledLinear`, and
quantized ones into mistol.quant's layout, their pages released the same way.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import MistolError
from ..model import ModelConfig, Transformer
from ..model.embedding import FloatRowsEmbedding
from ..model.linear import TiledLinear, tiles_pay_off
from .memory import release_pages
from .safetensors_file import SafetensorsFile

# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
QUANT_FORMATS = ("int8", "int4")  # weight-only quantization of the linear layers (mistol.quant)
_SLAB = 1 << 22  # elements converted at a time
_SMALL = 1 << 20  # bytes: vectors under this size are copied out of the mapped file


@dataclass
class TensorSource:
    """One tensor of a checkpoint, read on demand."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    read: Callable[[], torch.Tensor]


def find_weight_files(model_dir: Path) -> list[Path]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise MistolError(f"{index}: not a valid checkpoint index ({e})") from None
            files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise MistolError(f"{index}: names shard files that are missing: {', '.join(missing)}")
            return files
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise MistolError(
        f"{model_dir}: no weights found (expected model.safetensors, sharded "
        "model-*-of-*.safetensors with model.safetensors.index.json, or pytorch_model*.bin)"
    )


def iter_tensor_sources(files: list[Path]) -> Iterator[TensorSource]:
    for path in files:
        if path.suffix == ".safetensors":
            st = SafetensorsFile(path)
            for name in st.keys():
                yield TensorSource(name, path, st.shape(name), st.dtype(name), st.nbytes(name),
                                   lambda st=st, n=name: st.tensor(n))
        else:
            state = _load_bin(path)
            for name, t in state.items():
                yield TensorSource(name, path, tuple(t.shape), t.dtype, t.numel() * t.element_size(), lambda t=t: t)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle/zip
        raise MistolError(f"{path}: truncated or corrupt PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise MistolError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def model_key(hf_name: str) -> str | None:
    """Hugging Face tensor name -> our parameter name (None: not a model parameter)."""
    if hf_name.endswith(_IGNORED_SUFFIXES):
        return None
    key = hf_name.removeprefix("model.")
    if key.endswith("_proj.bias") and ".self_attn." in key:  # the attention keeps its biases itself
        key = key.removesuffix("_proj.bias") + "_bias"
    return key


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    quant: str | None = None,
) -> Transformer:
    """Build a `Transformer` from a Hugging Face model directory.

    `quant` ("int8" or "int4", see `mistol.quant`) quantizes every linear layer's weight
    as it is read, so memory peaks near the quantized size; embeddings and norms stay in
    `dtype`.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MistolError(f"{model_dir}: no such model directory")
    if quant is not None and quant not in QUANT_FORMATS:
        raise MistolError(f"unknown quantization {quant!r} (choose from {', '.join(QUANT_FORMATS)})")
    config = ModelConfig.from_file(model_dir / "config.json")
    files = find_weight_files(model_dir)
    sources = list(iter_tensor_sources(files))
    # checked before a model of that many layers is built to load into (a billion would take
    # minutes and gigabytes to fail)
    held = {int(m.group(1)) for s in sources if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", s.name))}
    if config.num_layers > len(held):
        raise MistolError(f"{model_dir / 'config.json'}: num_hidden_layers is {config.num_layers}, "
                          f"but the checkpoint holds the tensors of {len(held)} layers")
    model = Transformer(config, device="meta")
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    device = torch.device(device)

    total = sum(s.nbytes for s in sources)
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights", disable=bar_disabled(progress)) as bar:
        for src in sources:
            key = model_key(src.name)
            if key == "lm_head.weight" and config.tie_word_embeddings:
                key = None
            if key is not None:
                if key not in expected:
                    raise MistolError(f"{src.file}: unexpected tensor {src.name!r} for this config.json")
                want = tuple(expected[key].shape)
                if src.shape != want:
                    raise MistolError(
                        f"{src.file}: tensor {src.name!r} has shape {list(src.shape)}, "
                        f"config.json implies {list(want)}"
                    )
                if quant and _is_linear_weight(model, key):
                    _set_quantized(model, key, src.read(), quant, device)
                elif key == "embed_tokens.weight" and _keep_stored_rows(src, quant, dtype, device):
                    model.embed_tokens = FloatRowsEmbedding(src.read(), dtype)
                elif _is_linear_weight(model, key) and tiles_pay_off(src.shape, device):
                    weight = src.read()
                    set_linear(model, key, TiledLinear.from_rows(lambda r0, r1: weight[r0:r1], *src.shape, dtype,
                                                                 release=release_pages))
                else:
                    set_parameter(model, key, to_target(src.read(), dtype, device))
                loaded.add(key)
            bar.update(src.nbytes)

    missing = [k for k in expected if k not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise MistolError(f"{model_dir}: checkpoint is missing {len(missing)} tensor(s): {shown}")
    if isinstance(model.embed_tokens, FloatRowsEmbedding):
        from ..quant import quantize_tied_head

        quantize_tied_head(model)  # (a tied head cannot multiply the stored rows: an int8 copy)
    model.rotary.to(device)
    return model.eval().requires_grad_(False)


def _keep_stored_rows(src: TensorSource, quant: str | None, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a quantized model's embedding stays the checkpoint's bf16/f16 rows (see
    model/embedding.py) rather than a float32 copy."""
    return quant is not None and device.type == "cpu" and dtype == torch.float32 and src.dtype in (torch.bfloat16, torch.float16)


def to_target(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`t` (a view of a mapped file, read for the last time) in `dtype` on `device`."""
    if t.dtype == dtype and t.device == device:
        if t.dim() > 1 or t.nbytes >= _SMALL or not t.is_contiguous():
            return t  # stays a view of the mapped file: no copy
        # A norm's weight or a bias read in place would map in the file's pages around it
        # when first read (fault-around, or a whole page-cache folio of up to 2 MB): pages of
        # layers converted and given back, counted in RSS again (~90 MB of a 7B Q4_0 file).
        out = t.clone()
        release_pages(t)
        return out
    if not t.is_contiguous():
        out = t.to(device=device, dtype=dtype, copy=True)
        release_pages(t)
        return out
    # A slab at a time, each slab's mapped pages given back once copied: memory peaks near
    # the converted size, not converted + source (the embedding is the largest tensor).
    out = torch.empty(t.shape, dtype=dtype, device=device)
    src, dst = t.view(-1), out.view(-1)
    for i in range(0, src.numel(), _SLAB):
        dst[i : i + _SLAB].copy_(src[i : i + _SLAB])
        release_pages(src[i : i + _SLAB])
    return out


def set_parameter(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_path, _, attr = key.rpartition(".")
    module = model.get_submodule(module_path)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


def _is_linear_weight(model: nn.Module, key: str) -> bool:
    module_path, _, attr = key.rpartition(".")
    return attr == "weight" and isinstance(model.get_submodule(module_path), nn.Linear)


def _set_quantized(model: nn.Module, key: str, weight: torch.Tensor, fmt: str, device: torch.device) -> None:
    """Quantize a linear layer's (memory-mapped) weight and put a `QuantizedLinear` in its place."""
    from ..quant import quantize_linear

    set_linear(model, key, quantize_linear(weight, fmt, name=key, release=release_pages).to(device))


def set_linear(model: nn.Module, key: str, layer: nn.Module) -> None:
    """Put `layer` (a `QuantizedLinear` or `TiledLinear`) in place of the linear layer whose
    weight is `key`."""
    parent, _, name = key.removesuffix(".weight").rpartition(".")
    setattr(model.get_submodule(parent), name, layer)


def bar_disabled(progress: bool | None) -> bool | None:
    # tqdm: disable=None means "only on a terminal"
    return None if progress is None else not progress
