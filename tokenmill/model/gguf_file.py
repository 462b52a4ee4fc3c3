"""The GGUF container read in place: metadata as Python values, tensors as numpy views of the
memory-mapped file (nothing is copied until a caller asks).

Why not `gguf.GGUFReader`: it wraps every metadata item in numpy memmap slices, about eight per
string, so the 49,152-token vocabulary and merges of the default model take 10-15 s to parse on
this machine's CPUs. Here a string is one struct read and one decode, and an array of numbers
is one np.frombuffer: the same file parses in well under a second. The tensor views follow
GGUFReader's conventions (dims reversed to numpy order; float and integer types as their numpy
dtype, quantized types as uint8 with the innermost dim in bytes), so callers handle either.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata
count; metadata as (string key, u32 type, value); tensor infos as (string name, u32 n_dims,
u64 dims innermost first, u32 type, u64 offset); the tensor data starts at the next multiple
of `general.alignment` (32 by default)."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Metadata value types (gguf's GGUFValueType) -> struct format of one scalar.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
# Tensor types stored as plain numbers (everything else is blocks of bytes).
_PLAIN = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (or are cut short)."""


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: innermost dim first
    data_offset: int  # from the start of the file
    n_bytes: int
    data: np.ndarray  # a read-only view of the mapped file


@dataclass
class GGUFFile:
    version: int
    metadata: dict[str, object]
    tensors: list[GGUFTensor]


class _Cursor:
    """Sequential little-endian reads from a buffer; every overrun is a GGUFFormatError."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise GGUFFormatError(f"ends inside the header (needs byte {start + n}, has {len(self.buf)})")
        self.pos = start + n
        return start

    def scalar(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"a string at byte {start} is not UTF-8") from e

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary, its merges): one tight loop, bounds checked
        once at the end (a slice past the end is only short, and leaves pos past it)."""
        buf, pos, unpack = self.buf, self.pos, struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                append(buf[pos + 8:pos + 8 + n].decode("utf-8"))
                pos += 8 + n
        except struct.error as e:
            raise GGUFFormatError(f"ends inside a string array (at byte {pos})") from e
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"a string at byte {pos} is not UTF-8") from e
        if pos > len(buf):
            raise GGUFFormatError(f"ends inside a string array (needs byte {pos}, has {len(buf)})")
        self.pos = pos
        return out

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _NUMPY:  # one read for the whole array: token types, scores...
                dtype = np.dtype(_NUMPY[item])
                start = self.take(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype, count, start).tolist()
            if item == _STRING:
                return self.strings(count)
            return [self.value(item) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata value type {kind}")


def read_gguf_file(path: str) -> GGUFFile:
    """Parse the header of `path` and map its tensors (read-only views; the mapping lives as
    long as any of them)."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file cannot be mapped
            raise GGUFFormatError(f"empty or unmappable file ({e})") from e
    return parse(buf)


def parse(buf) -> GGUFFile:
    c = _Cursor(buf)
    if bytes(buf[c.take(4):4]) != MAGIC:
        raise GGUFFormatError(f"bad magic {bytes(buf[:4])!r} (expected {MAGIC!r})")
    version = c.scalar("<I")
    if version not in VERSIONS:
        raise GGUFFormatError(f"unsupported GGUF version {version} (supported: {VERSIONS}; big-endian files are not)")
    n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = c.string()
        metadata[key] = c.value(c.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(c.scalar("<Q") for _ in range(c.scalar("<I")))
        raw_type, offset = c.scalar("<I"), c.scalar("<Q")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError as e:
            raise GGUFFormatError(f"tensor {name!r} has unknown type {raw_type}") from e
        infos.append((name, dims, qtype, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0:
        raise GGUFFormatError(f"general.alignment is {alignment}")
    data_start = -(-c.pos // alignment) * alignment
    tensors, names = [], set()
    for name, dims, qtype, offset in infos:
        if name in names:
            raise GGUFFormatError(f"tensor {name!r} appears twice")
        names.add(name)
        tensors.append(_tensor(buf, name, dims, qtype, data_start + offset))
    return GGUFFile(version, metadata, tensors)


def _tensor(buf, name: str, dims: tuple[int, ...], qtype: GGMLQuantizationType, start: int) -> GGUFTensor:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_elems = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if dims and dims[0] % block_size:
        raise GGUFFormatError(f"tensor {name!r}: {dims[0]} values per row is not a multiple of {qtype.name}'s block of {block_size}")
    n_bytes = n_elems // block_size * type_size
    if start + n_bytes > len(buf):
        raise GGUFFormatError(f"truncated: tensor {name!r} needs bytes {start}..{start + n_bytes} but the file has {len(buf)}")
    shape = tuple(reversed(dims)) or (1,)  # a scalar as one value, as gguf's reader has it
    if qtype in _PLAIN:
        data = np.frombuffer(buf, _PLAIN[qtype], n_elems, start).reshape(shape)
    else:  # blocks: the innermost dim in bytes
        data = np.frombuffer(buf, np.uint8, n_bytes, start).reshape(*shape[:-1], shape[-1] // block_size * type_size)
    return GGUFTensor(name, qtype, dims, start, n_bytes, data)
