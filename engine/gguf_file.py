"""A GGUF file's metadata and tensor table, read directly (the layout: llama.cpp's docs/gguf.md).

gguf-py's `GGUFReader` builds a numpy view for every part of every key-value: ~2.6 s on one core for SmolLM2's
49,152 tokens and 48,900 merges, which the router paid for its tokenizer and a worker twice (config, weights).
This reads the header, the key-values and the tensor table with `struct` over one memory map (~0.1 s), and gives
each tensor the numpy view of its bytes that `GGUFReader` gives (typed for float and integer tensors, rows of
quantized blocks as uint8), so `gguf.quants.dequantize` takes it unchanged.

Layout (little-endian; versions 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64 key-value count; each
key-value a string key, a u32 value type, the value (strings: u64 length + UTF-8 bytes; arrays: u32 item type,
u64 count, the items); each tensor a string name, u32 dimension count, u64 dimensions (innermost first), u32 ggml
type, u64 offset into the data section, which starts at the next multiple of `general.alignment` (32 by default).
Anything malformed (bad magic, a count or length past the end, a tensor's bytes past the end) raises ValueError.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
STRING, ARRAY, BOOL = 8, 9, 7
# value type -> struct format of one item (strings and arrays are read apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml types whose tensors are plain arrays of one numpy dtype (the rest are quantized blocks, read as bytes)
PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
         GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
         GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry and bytes (the fields `gguf.ReaderTensor` has under the same names)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: the innermost (contiguous) dimension first
    n_bytes: int
    data: np.ndarray  # a read-only view of the file: numpy's shape (outermost first), bytes for quantized rows


@dataclass(frozen=True)
class GGUFFile:
    """What `read_gguf` found: every key-value as a Python value, the tensors in file order."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]
    metadata_end: int  # the offset where the key-values end (the tensor table starts)


class _Cursor:
    """Reads forward through `buf`, checking every read against its end."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.at = buf, size, 0

    def take(self, n: int) -> int:
        if n < 0 or self.at + n > self.size:
            raise ValueError(f"ends inside a field at byte {self.at} (wants {n} more of {self.size})")
        start, self.at = self.at, self.at + n
        return start

    def unpack(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        return bytes(self.buf[self.take(n):self.at]).decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            return self.array()
        if kind not in SCALARS:
            raise ValueError(f"unknown value type {kind} at byte {self.at}")
        return self.unpack(SCALARS[kind])

    def array(self) -> list[Any]:
        kind, count = self.unpack("<I"), self.unpack("<Q")
        if kind in SCALARS:  # one numpy read for a numeric array (token types, scores)
            fmt = SCALARS[kind]
            start = self.take(count * struct.calcsize(fmt))
            items = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=start).tolist()
            return [bool(x) for x in items] if kind == BOOL else items
        if count > self.size - self.at:  # every string or array item takes at least one byte
            raise ValueError(f"an array of {count} items at byte {self.at} cannot fit in the file")
        return [self.value(kind) for _ in range(count)]


def read_gguf(path: str, tensors: bool = True) -> GGUFFile:
    """The file's metadata and (unless `tensors` is False) its tensor table with views of their bytes."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise ValueError(f"{size} bytes is too short for a GGUF header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, size)
    if bytes(buf[:4]) != MAGIC:
        raise ValueError("no GGUF magic")
    cur.take(4)
    version = cur.unpack("<I")
    if version not in VERSIONS:
        raise ValueError(f"GGUF version {version} (big-endian, or not one of {VERSIONS})")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata: dict[str, Any] = {}
    try:
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
    except RecursionError:
        raise ValueError("arrays nested too deeply") from None
    end = cur.at
    table = _tensor_table(cur, n_tensors, metadata) if tensors else ()
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=table, metadata_end=end)


def _tensor_table(cur: _Cursor, count: int, metadata: dict[str, Any]) -> tuple[GGUFTensor, ...]:
    entries = []
    for _ in range(count):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions (ggml allows {MAX_DIMS})")
        dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
        entries.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    start = -(-cur.at // alignment) * alignment
    out, seen = [], set()
    for name, dims, raw_type, offset in entries:
        if name in seen:
            raise ValueError(f"tensor {name} appears twice")
        seen.add(name)
        if raw_type not in GGMLQuantizationType._value2member_map_:
            raise ValueError(f"tensor {name} has unknown ggml type {raw_type}")
        out.append(_tensor(cur, name, dims, GGMLQuantizationType(raw_type), start + offset))
    return tuple(out)


def _tensor(cur: _Cursor, name: str, dims: tuple[int, ...], kind: GGMLQuantizationType, at: int) -> GGUFTensor:
    if kind not in GGML_QUANT_SIZES:
        raise ValueError(f"tensor {name} has ggml type {kind.name}, of no known block size")
    block, type_size = GGML_QUANT_SIZES[kind]
    n_elements = int(np.prod(dims, dtype=np.int64))
    n_bytes = n_elements * type_size // block
    if at + n_bytes > cur.size:
        raise ValueError(f"tensor {name}'s {n_bytes} bytes at {at} run past the end of the file ({cur.size} bytes)")
    shape = tuple(reversed(dims))
    if kind in PLAIN:
        data = np.frombuffer(cur.buf, dtype=PLAIN[kind], count=n_elements, offset=at).reshape(shape)
    else:
        data = np.frombuffer(cur.buf, dtype=np.uint8, count=n_bytes, offset=at).reshape(
            quant_shape_to_byte_shape(shape, kind))
    return GGUFTensor(name=name, tensor_type=kind, shape=dims, n_bytes=n_bytes, data=data)
