"""A bounded walk over a GGUF header before `gguf.GGUFReader` sees the file.

Every count, length and offset is checked against the bytes that remain, so a damaged header
(an array claiming 2^63 elements, a string longer than the file, a tensor past the end) is a
one-line LmlabError naming the file and the field instead of a loop that grows memory. Strings
must be UTF-8. The walk reads the header only; it never touches tensor data.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmlab.errors import LmlabError

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4
# GGUFValueType → struct code of a fixed-size value (STRING = 8 and ARRAY = 9 have variable size)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class _Cursor:
    def __init__(self, data: bytes, path: Path, order: str):
        self.data, self.path, self.order, self.pos = data, path, order, 0

    def fail(self, field: str, what: str) -> LmlabError:
        field = field if field.isprintable() else repr(field)  # a key from the file may hold a newline
        return LmlabError(f"{self.path}: {field}: {what} (at byte {self.pos} of {len(self.data)})")

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.left():
            raise self.fail(field, f"needs {n} bytes, only {self.left()} remain (truncated or damaged header)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, code: str, field: str):
        return struct.unpack(self.order + code, self.take(struct.calcsize(code), field))[0]

    def count(self, field: str, min_item: int) -> int:
        """A uint64 count of items each at least `min_item` bytes long, checked against what remains."""
        n = self.unpack("Q", field)
        if n * min_item > self.left():
            raise self.fail(field, f"claims {n} items of at least {min_item} bytes, only {self.left()} bytes remain")
        return n

    def string(self, field: str) -> str:
        raw = self.take(self.count(field, 1), field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(field, f"string is not UTF-8 (byte {e.start})") from None

    def value(self, vtype: int, field: str, depth: int = 0):
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype], field)
        if vtype == STRING:
            return self.string(field)
        if vtype == ARRAY:
            if depth >= MAX_NESTING:
                raise self.fail(field, f"arrays nested deeper than {MAX_NESTING}")
            item = self.unpack("I", field + " (array item type)")
            if item in SCALARS:
                size = struct.calcsize(SCALARS[item])
                self.take(self.count(field, size) * size, field)  # skipped: the fixed-size items are not needed
                return None
            if item not in (STRING, ARRAY):
                raise self.fail(field, f"unknown array item type {item}")
            n = self.count(field, 8 if item == STRING else 12)
            return [self.value(item, f"{field}[{i}]", depth + 1) for i in range(n)]
        raise self.fail(field, f"unknown value type {vtype} (allowed: 0..12)")


def check_header(path: str | Path) -> None:
    """Raise LmlabError naming the file and field when the GGUF header cannot be read within the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != b"GGUF":
            raise LmlabError(f"{path}: not a GGUF file (no GGUF magic)")
        order = "<"
        if len(head) >= 8 and struct.unpack("<I", head[4:8])[0] & 0xFFFF == 0:
            order = ">"  # written on a big-endian machine
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        _walk(_Cursor(data, path, order), path, size)
    finally:
        data.close()


def _walk(cur: _Cursor, path: Path, size: int) -> None:
    cur.take(4, "magic")
    version = cur.unpack("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail("version", f"GGUF version {version} is not supported (allowed: 2, 3)")
    n_tensors = cur.unpack("Q", "tensor_count")
    n_kv = cur.count("kv_count", 8 + 8 + 4 + 1)  # key length, shortest key, type, smallest value
    alignment = DEFAULT_ALIGNMENT
    seen: set[str] = set()
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in seen:
            raise cur.fail(key, "duplicate metadata key")
        seen.add(key)
        vtype = cur.unpack("I", key + " (value type)")
        value = cur.value(vtype, key)
        if key == "general.alignment":
            if vtype != 4 or value == 0 or value & (value - 1):
                raise cur.fail(key, f"{value!r} is not a power of two stored as uint32")
            alignment = value
    if n_tensors * (8 + 1 + 4 + 4 + 8) > cur.left():
        raise cur.fail("tensor_count", f"claims {n_tensors} tensors, only {cur.left()} header bytes remain")
    tensors = [_tensor_info(cur, i) for i in range(n_tensors)]
    start = cur.pos + (-cur.pos % alignment)
    for name, offset, n_bytes in tensors:
        if offset % alignment:
            raise LmlabError(f"{path}: tensor {name!r}: data offset {offset} is not a multiple of {alignment}")
        if start + offset + n_bytes > size:
            raise LmlabError(f"{path}: truncated: tensor {name!r} needs bytes up to {start + offset + n_bytes}, "
                             f"file has {size}")


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, int, int]:
    name = cur.string(f"tensor #{i} name")
    n_dims = cur.unpack("I", f"tensor {name!r} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} n_dims", f"{n_dims} (allowed: 1..{MAX_DIMS})")
    dims = [cur.unpack("Q", f"tensor {name!r} shape") for _ in range(n_dims)]
    code = cur.unpack("I", f"tensor {name!r} type")
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(code)]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} type", f"unknown GGML tensor type {code}") from None
    offset = cur.unpack("Q", f"tensor {name!r} offset")
    if dims[0] % block:
        raise cur.fail(f"tensor {name!r} shape", f"row length {dims[0]} is not a multiple of the block size {block}")
    n = 1
    for d in dims:
        n *= d
    return name, offset, n // block * type_size
