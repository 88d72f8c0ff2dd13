"""Zero-copy reading of `.safetensors` files.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw data. We map the file (private, copy-on-write:
the file itself is never modified) and hand out tensors that are views into the mapping,
so a checkpoint in the dtype we compute in costs no copy at all.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from ..errors import MistolError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = self.path.stat().st_size
                if size < 8:
                    raise ValueError("shorter than its 8-byte header length")
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError(f"header of {header_len} bytes in a file of {size}")
                header = json.loads(f.read(header_len))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise MistolError(f"{self.path}: cannot read ({e.strerror or e})") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise MistolError(f"{self.path}: truncated or corrupt safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise MistolError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None)
        self.metadata: dict[str, str] = metadata if isinstance(metadata, dict) else {}
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            try:
                start, end = entry["data_offsets"]
                dtype = entry["dtype"]
                shape = entry["shape"]
            except (KeyError, TypeError, ValueError):
                raise MistolError(f"{self.path}: corrupt header entry for tensor {name!r}") from None
            if not (isinstance(shape, list) and all(_count(d) for d in shape) and _count(start) and _count(end)
                    and start <= end):
                raise MistolError(f"{self.path}: corrupt header entry for tensor {name!r} (shape or byte range)")
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise MistolError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            if self._data_start + end > size:
                raise MistolError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte "
                    f"{self._data_start + end}, the file has {size}"
                )
            itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
            if end - start != itemsize * _numel(shape):
                raise MistolError(f"{self.path}: tensor {name!r} has a byte range that does not match its shape")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        start, end = self._entries[name]["data_offsets"]
        return end - start

    def tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        dtype = DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        shape = entry["shape"]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=_numel(shape), offset=self._data_start + start)
        return flat.view(shape)


def _count(value) -> bool:
    """A dimension or an offset: a whole number >= 0 (JSON's true and 2.0 are not)."""
    return type(value) is int and value >= 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors in the safetensors format (contiguous, little-endian, 8-byte aligned header)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
