"""A GGUF file's header: its key/value metadata and its tensors' descriptions, parsed into
plain Python values, with each tensor's data a view of the mapped file.

`gguf.GGUFReader` keeps every element of every metadata array as numpy views (two per
string): for a 151,936-token vocabulary and its merges (Qwen2.5) that is 300,000+ arrays and
~0.4 GB of memory held while a model loads, next to a 0.4 GB Q4_K_M file. Here a string
array is a list of bytes objects (decoded when read) and a number array one numpy array.
The layout (llama.cpp's gguf.md): magic "GGUF", version (2 or 3), tensor count, metadata
count (u64), the metadata (key string, value type u32, value), the tensor descriptions (name,
dimension count u32, dimensions u64, type u32, offset u64), then the data from the next
multiple of `general.alignment` (32 unless given). The type tables are the gguf package's.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .gguf_package import gguf

GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType = (
    gguf.GGML_QUANT_SIZES, gguf.GGMLQuantizationType, gguf.GGUFValueType)

DEFAULT_ALIGNMENT = 32
VERSIONS = (2, 3)
_SCALARS = {  # value type -> struct format, numpy dtype (little-endian)
    GGUFValueType.UINT8: ("<B", "<u1"), GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"), GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"), GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.UINT64: ("<Q", "<u8"), GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT32: ("<f", "<f4"), GGUFValueType.FLOAT64: ("<d", "<f8"),
    GGUFValueType.BOOL: ("<?", "?"),
}
_ELEMENT_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                   GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                   GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                   GGMLQuantizationType.I64: np.int64}  # every other type: its blocks as bytes


class HeaderError(ValueError):
    """The header cannot be parsed (cut off, a count or type out of range, a big-endian file)."""


class Tensor(NamedTuple):
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # dimensions as the file lists them, innermost first
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray  # a view of the mapped file: values, or each row's blocks as bytes


class StringArray(list):
    """A metadata array of strings, as the bytes the file holds (decoded when read)."""


class Header(NamedTuple):
    metadata: dict[str, Any]  # a number, bool, bytes (a string), numpy array or StringArray
    tensors: list[Tensor]


def read_header(path: str | Path, mode: str = "c") -> Header:
    """Parse the header of the GGUF file at `path`, mapped with numpy's `mode` ("c":
    copy-on-write, so tensors can be used in place and the file is never written)."""
    data = np.memmap(path, mode=mode)
    reader = _Cursor(memoryview(data))
    if reader.take(4) != b"GGUF":
        raise HeaderError("not a GGUF file")
    version = reader.scalar(GGUFValueType.UINT32)
    if version & 0xFFFF == 0:
        raise HeaderError("a big-endian file (mistol reads little-endian GGUF files, as llama.cpp writes them)")
    if version not in VERSIONS:
        raise HeaderError(f"GGUF version {version} (mistol reads versions {' and '.join(map(str, VERSIONS))})")
    n_tensors, n_fields = reader.scalar(GGUFValueType.UINT64), reader.scalar(GGUFValueType.UINT64)
    metadata = {}
    for _ in range(reader.count(n_fields, 8)):
        key = reader.string().decode("utf-8", "replace")
        metadata[key] = reader.value(reader.value_type())
    infos = [reader.tensor_info() for _ in range(reader.count(n_tensors, 24))]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise HeaderError(f"general.alignment {alignment!r}")
    start = -(-reader.offset // alignment) * alignment
    names = set()
    tensors = []
    for name, dims, ggml_type, offset in infos:
        if name in names:
            raise HeaderError(f"two tensors named {name!r}")
        names.add(name)
        tensors.append(_tensor(data, name, dims, ggml_type, start + offset))
    return Header(metadata, tensors)


def _tensor(data: np.memmap, name: str, dims: np.ndarray, ggml_type: GGMLQuantizationType, offset: int) -> Tensor:
    n_elements = math.prod(int(d) for d in dims)  # (exact: a product of uint64s can wrap round to a plausible size)
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    if n_elements % block:
        raise HeaderError(f"tensor {name!r}: {n_elements} values are not whole blocks of {block}")
    n_bytes = n_elements // block * block_bytes
    if offset + n_bytes > data.size:
        raise HeaderError(f"tensor {name!r} ends at byte {offset + n_bytes}, past the file's end ({data.size})")
    shape = tuple(int(d) for d in reversed(dims))
    dtype = _ELEMENT_DTYPES.get(ggml_type)
    if dtype is None:
        dtype, shape = np.uint8, gguf.quants.quant_shape_to_byte_shape(shape, ggml_type)
    values = data[offset : offset + n_bytes].view(dtype).reshape(shape)
    return Tensor(name, ggml_type, dims, n_elements, n_bytes, offset, values)


class _Cursor:
    """Reads the header's values one after another."""

    def __init__(self, buffer: memoryview):
        self.buffer, self.offset = buffer, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.offset + n > len(self.buffer):
            raise HeaderError(f"cut off at byte {self.offset} (wanted {n} more)")
        out = self.buffer[self.offset : self.offset + n].tobytes()
        self.offset += n
        return out

    def scalar(self, value_type: GGUFValueType):
        fmt, _ = _SCALARS[value_type]
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.buffer):
            raise HeaderError(f"cut off at byte {self.offset}")
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return value

    def count(self, n: int, least_bytes: int) -> int:
        """A count read from the file, checked against the bytes left (each item takes at
        least `least_bytes`), so that a damaged count fails here, not in a huge allocation."""
        if n * least_bytes > len(self.buffer) - self.offset:
            raise HeaderError(f"a count of {n} at byte {self.offset}, more than the file holds")
        return n

    def string(self) -> bytes:
        return self.take(self.scalar(GGUFValueType.UINT64))

    def value_type(self) -> GGUFValueType:
        raw = self.scalar(GGUFValueType.UINT32)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise HeaderError(f"unknown value type {raw} at byte {self.offset - 4}") from None

    def value(self, value_type: GGUFValueType):
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type != GGUFValueType.ARRAY:
            return self.scalar(value_type)
        element_type = self.value_type()
        n = self.scalar(GGUFValueType.UINT64)
        if element_type == GGUFValueType.STRING:
            return StringArray(self.string() for _ in range(self.count(n, 8)))
        if element_type == GGUFValueType.ARRAY:
            return [self.value(GGUFValueType.ARRAY) for _ in range(self.count(n, 12))]
        _, dtype = _SCALARS[element_type]
        size = np.dtype(dtype).itemsize
        values = np.frombuffer(self.take(self.count(n, size) * size), dtype=dtype)
        return values

    def tensor_info(self) -> tuple[str, np.ndarray, GGMLQuantizationType, int]:
        name = self.string().decode("utf-8", "replace")
        n_dims = self.scalar(GGUFValueType.UINT32)
        dims = np.frombuffer(self.take(self.count(n_dims, 8) * 8), dtype="<u8")
        raw_type = self.scalar(GGUFValueType.UINT32)
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise HeaderError(f"tensor {name!r}: unknown type {raw_type}") from None
        return name, dims, ggml_type, self.scalar(GGUFValueType.UINT64)
