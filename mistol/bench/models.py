"""Random-weight models for `mistol bench`, each built straight in the format it runs.

Weights are drawn once per distinct matrix shape and copied into every layer, so building a
7B model costs a few draws and memory copies, not seven billion random numbers (each layer
still has its own memory: decoding reads all of it, as with real weights).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..engine import DTYPES
from ..model import ModelConfig, Transformer
from ..model.linear import Linear, TiledLinear, tiles_pay_off
from ..quant import QuantizedLinear, quantize_linear, quantize_tied_head
from .shapes import LLAMA_CPP_BYTES_PER_WEIGHT

QUANT_FORMATS = ("int8", "int4")
STD = 0.02
DTYPES_HF = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}  # config.json's torch_dtype


def random_block_rows(fmt: str, rows: int, k: int) -> torch.Tensor:
    """uint8 [rows, bytes per row] of llama.cpp block type fmt (Q4_K, Q6_K, Q5_0, ...) as a
    GGUF file holds them: random quants, fp16 scales of ~1e-3 (speed does not depend on the
    values)."""
    from ..block_quant import ROW_FORMATS, SCALE_OFFSETS

    block, nbytes = ROW_FORMATS[fmt]
    raw = torch.randint(0, 256, (rows, k // block, nbytes), dtype=torch.uint8)
    for off in SCALE_OFFSETS[fmt]:
        scales = (torch.rand(rows, k // block) * 3e-3 + 1e-3).half()
        raw[:, :, off:off + 2] = scales.view(torch.uint8).reshape(rows, k // block, 2)
    return raw.reshape(rows, -1)


def fill_random_context(session, context: int, generator: torch.Generator) -> None:
    """Give `session` (empty) a context of `context` tokens without running them: its cache
    holds random keys and values in the cache's own type, as if a prefill had written them
    (a step's cost does not depend on what they hold); a rolling cache (a sliding window
    shorter than the context) holds the last of them, each at its position's slot."""
    from ..model.kv_cache import Q8_0, quantize_q8_0

    cache = session.cache
    held = min(context, cache.capacity)
    tensors = cache.tensors()
    for name in ("k", "v"):
        rows = torch.randn((*cache.k.shape[:3], held, cache.k.shape[-1]), generator=generator)
        if cache.dtype == Q8_0:  # int8 quants and their scales
            tensors[name][:, :, :, :held], tensors[f"{name}_scale"][:, :, :, :held] = quantize_q8_0(rows)
        else:
            tensors[name][:, :, :, :held] = rows.to(tensors[name].dtype)
    positions = torch.arange(context - held, context)
    cache.slot_pos[positions % cache.capacity] = positions
    cache.length = context
    session.tokens = [5] * context


def _random(shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).normal_(0.0, STD, generator=generator)


def mistol_model(config: ModelConfig, fmt: str, seed: int = 0, device: str = "cpu") -> Transformer:
    """Our `Transformer` with random weights on `device`: linear layers in `fmt` (int8/int4
    quantized, or bf16/f16/f32, long rows in tiles on a CPU as the loaders hold them),
    embeddings and norms in float32 for the quantized formats."""
    dtype = torch.float32 if fmt in QUANT_FORMATS else DTYPES[fmt]
    generator = torch.Generator().manual_seed(seed)
    model = Transformer(config, device="meta")
    templates: dict[tuple[int, int], torch.Tensor | QuantizedLinear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        shape = (module.out_features, module.in_features)
        if shape not in templates:
            weight = _random(shape, torch.bfloat16 if fmt in QUANT_FORMATS else dtype, generator)
            templates[shape] = quantize_linear(weight, fmt) if fmt in QUANT_FORMATS else weight
        template = templates[shape]
        if fmt in QUANT_FORMATS:
            layer = QuantizedLinear(module.in_features, module.out_features, fmt, template.packed.clone())
        elif tiles_pay_off(shape, torch.device(device)):
            layer = TiledLinear.from_rows(lambda r0, r1: template[r0:r1], *shape, dtype)
        else:
            layer = Linear(module.in_features, module.out_features, device="meta")
            layer.weight = nn.Parameter(template.clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    for name, param in list(model.named_parameters()):
        if param.device.type != "meta":
            continue
        value = torch.ones(param.shape, dtype=dtype) if name.endswith("norm.weight") else _random(param.shape, dtype, generator)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Parameter(value, requires_grad=False))
    model.rotary.to("cpu")
    quantize_tied_head(model)
    return model.to(device).eval().requires_grad_(False)


def transformers_model(hf_config: dict, fmt: str, seed: int = 0):
    """transformers' own model class at this shape, random weights in bf16/f16/f32."""
    import transformers

    arch = hf_config["architectures"][0]
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_class(**{k: v for k, v in hf_config.items() if k != "architectures"})
    config.architectures = [arch]
    dtype = DTYPES[fmt]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: no float32 model first
    try:
        model = getattr(transformers, arch)(config)
    finally:
        torch.set_default_dtype(previous)
    generators: dict[torch.device, torch.Generator] = {}  # the model may live on a GPU
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.normal_(0.0, STD, generator=generators[param.device])
    return model.eval().requires_grad_(False)


def gguf_tensors(config: ModelConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, random bf16 tensor) for every weight, one at a time, as
    `write_gguf` and `write_bench_checkpoint` take them; equal shapes share one draw."""
    generator = torch.Generator().manual_seed(seed)
    drawn: dict[tuple[int, ...], torch.Tensor] = {}
    for name, param in Transformer(config, device="meta").named_parameters():
        hf_name = name if name.startswith("lm_head") else f"model.{name}"
        if name.endswith("norm.weight"):
            yield hf_name, torch.ones(param.shape)
            continue
        shape = tuple(param.shape)
        if shape not in drawn:
            drawn[shape] = _random(shape, torch.bfloat16, generator)
        yield hf_name, drawn[shape]


ROOM_TO_SPARE = 512 << 20  # a bench file leaves at least this much of its file system free


def file_bytes_per_weight(file_type: str) -> float:
    """Bytes a weight takes in a bench file of `file_type` that mistol writes (F16, Q8_0, ...)."""
    from ..weights.gguf_export import BYTES_PER_32

    return BYTES_PER_32[file_type] / 32


def ensure_room(path: Path, nbytes: float) -> None:
    """Raises OSError, before anything is written, where a file of about `nbytes` would not
    fit in `path`'s file system with ROOM_TO_SPARE left (a 7B bench file is 4-15 GB)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if nbytes + ROOM_TO_SPARE > free:
        raise OSError(f"{path.name} needs {nbytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free in {path.parent} "
                      f"(--cache-dir DIR puts the bench's files elsewhere)")


@contextlib.contextmanager
def removed_on_failure(partial: Path):
    """A file or directory being written is removed if writing it fails or is interrupted:
    a half-written 7B file would hold gigabytes of a full disk."""
    try:
        yield
    except BaseException:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise


def write_bench_gguf(path: Path, config: ModelConfig, tensor_type: str, progress: bool = True) -> Path:
    from ..weights.gguf_export import write_gguf
    from .shapes import all_weights, synthetic_tokenizer

    partial = path.with_name(path.name + ".partial")
    # A tied embedding is also the head: Q8_0 at 4 bits, as mistol runs it (shapes.head_format)
    embedding_type = "Q8_0" if config.tie_word_embeddings and tensor_type == "Q4_0" else None
    ensure_room(path, all_weights(config) * file_bytes_per_weight(embedding_type or tensor_type))
    path.parent.mkdir(parents=True, exist_ok=True)
    with removed_on_failure(partial):
        write_gguf(partial, config, gguf_tensors(config), synthetic_tokenizer(config.vocab_size),
                   tensor_type=tensor_type, embedding_type=embedding_type, progress=progress)
    partial.replace(path)  # only a whole file gets the final name (a cache for the next run)
    return path


def write_bench_checkpoint(directory: Path, shape: str, fmt: str, progress: bool | None = True) -> Path:
    """A Hugging Face model directory (config.json, model.safetensors) of random weights at
    `shape` in a float format (bf16, f16, f32), the same values as the GGUF files'.

    mistol and transformers both map such a file and compute on the mapped weights, so two
    engines loaded from it hold one copy of the weights between them (the page cache's): a
    bf16 7B model (14.5 GB) fits twice in 24 GB this way, and the two can take turns.
    """
    from tqdm import tqdm

    from ..engine import DTYPES
    from ..weights.safetensors_file import DTYPES as FILE_DTYPES
    from .shapes import hf_config, model_config

    dtype = DTYPES[fmt]
    file_dtype = next(name for name, t in FILE_DTYPES.items() if t == dtype)
    config = model_config(shape)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tensors = list(gguf_tensors(config))  # equal shapes share one draw: ~0.5 GB at 7B
    entries, offset = {}, 0
    for name, t in tensors:  # a header first: names, shapes and byte ranges
        size = t.numel() * dtype.itemsize
        entries[name] = {"dtype": file_dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    ensure_room(directory, offset)
    partial.mkdir(parents=True)
    with removed_on_failure(partial), open(partial / "model.safetensors", "wb") as f, tqdm(
            total=offset, unit="B", unit_scale=True, desc=f"Writing {shape} {fmt} weights",
            disable=None if progress is None else not progress) as bar:
        (partial / "config.json").write_text(json.dumps({**hf_config(shape), "torch_dtype": DTYPES_HF[fmt]}, indent=2))
        f.write(len(header).to_bytes(8, "little") + header)
        for _, t in tensors:
            f.write(t.to(dtype).contiguous().view(torch.uint8).numpy())
            bar.update(t.numel() * dtype.itemsize)
    shutil.rmtree(directory, ignore_errors=True)
    partial.replace(directory)  # only a whole checkpoint gets the final name (a cache for the next run)
    return directory



def write_llama_cpp_quantized(path: Path, source: Path, ftype: str, threads: int) -> Path:
    """`source` (an F16 GGUF) quantized to `ftype` ("Q4_K_M", "Q6_K", ...) by llama.cpp's own
    quantizer, so that both engines run a file llama.cpp made and chose the types of."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    partial = path.with_name(path.name + ".partial")
    ensure_room(path, source.stat().st_size / file_bytes_per_weight("F16") * LLAMA_CPP_BYTES_PER_WEIGHT[ftype])
    with removed_on_failure(partial):
        with _quiet_stderr():  # llama.cpp logs a line per tensor; the caller says what it is doing
            failed = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if failed:
            raise OSError(f"llama.cpp could not quantize {source} to {ftype}")
    partial.replace(path)
    return path


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for a while (where C code writes its logs)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
