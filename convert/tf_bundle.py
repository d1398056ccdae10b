"""Read a TensorFlow checkpoint (a "tensor bundle") with numpy alone, no TensorFlow.

OpenAI released GPT-2 as a TF1 `Saver` checkpoint: `model.ckpt.index` is a LevelDB-style sorted
table mapping each variable name to a `BundleEntryProto` (dtype, shape, offset, size, crc32c),
and `model.ckpt.data-00000-of-00001` is the raw little-endian tensor bytes back to back.

Index file layout (all integers little-endian):

    [data block][trailer] ... [metaindex block][trailer] [index block][trailer] [footer: 48 bytes]

- footer: two BlockHandles (varint64 offset, varint64 size) for the metaindex and index
  blocks, zero-padded to 40 bytes, then the magic 0xdb4775248b80fb57 as a fixed64.
- trailer: 1 compression-type byte (0 = none) + masked crc32c of (block contents + type byte).
- block: entries `varint32 shared, varint32 non_shared, varint32 value_len, key[shared:], value`
  (keys are prefix-compressed against the previous key), then `fixed32 restarts[n]`,
  `fixed32 n`; a restart point is an entry stored with shared = 0.
- the index block maps a separator key >= each data block's last key to that block's handle.
  We walk the data blocks in index order and take the real keys from them.

Every block crc and every tensor crc is verified; anything this reader does not implement
(snappy-compressed blocks, dtypes other than float32, several shards, partitioned/sliced
variables, big-endian data) raises `BundleError` instead of returning a wrong tensor.
Tensor data is memory-mapped, so a 6 GB shard costs no RAM until its pages are touched; tensors
that the caller will copy anyway (transposes) can be read into a buffer instead (`mmap=False`).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2_scratch.convert.errors import BundleError

log = logging.getLogger(__name__)

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # 2 BlockHandles padded to 40 bytes + 8 bytes of magic
BLOCK_TRAILER_SIZE = 5  # 1 type byte + fixed32 masked crc
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1
CRC_MASK_DELTA = 0xA282EAD8
BUNDLE_VERSION = 1  # tensorflow/core/util/tensor_bundle: kTensorBundleVersion

# tensorflow/core/framework/types.proto: the enum values a GPT-2 checkpoint might plausibly hold,
# named so the error for an unsupported one is readable.
DT_FLOAT = 1
DTYPE_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
               7: "string", 9: "int64", 10: "bool", 14: "bfloat16", 19: "float16"}

# ---------------------------------------------------------------------------------------------
# crc32c (Castagnoli), masked the LevelDB way
# ---------------------------------------------------------------------------------------------
try:  # The C extension runs at several GB/s; the shards are 0.5-6 GB.
    import google_crc32c as _gcrc

    def crc32c(data, crc: int = 0) -> int:
        """crc32c of a bytes-like object, continuing from `crc`."""
        return _gcrc.extend(crc, bytes(data))

except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    _gcrc = None
    _TABLE = []
    for _n in range(256):
        _c = _n
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _TABLE.append(_c)

    def crc32c(data, crc: int = 0) -> int:
        """Table-driven crc32c; slow (~MB/s), used only if google-crc32c is not installed."""
        if len(data) > 1 << 20:
            log.warning("checking a %d-byte crc32c in pure Python is slow: `pip install google-crc32c`", len(data))
        crc ^= 0xFFFFFFFF
        for byte in bytes(data):
            crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """LevelDB stores crc's rotated and offset, so a crc of data containing crc's stays strong."""
    rot = (masked - CRC_MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + CRC_MASK_DELTA) & 0xFFFFFFFF


def crc32c_of_array(arr: np.ndarray, chunk_bytes: int = 16 << 20) -> int:
    """crc32c of an array's raw bytes, in chunks so a memory-mapped 1 GB tensor is never copied whole."""
    flat = arr.reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, flat.size, chunk_bytes):
        crc = crc32c(flat[start:start + chunk_bytes], crc)
    return crc


# ---------------------------------------------------------------------------------------------
# varints and a minimal protobuf wire-format decoder
# ---------------------------------------------------------------------------------------------
class _Truncated(Exception):
    """Internal: a varint or field ran past the end of its buffer."""


def read_varint(buf, pos: int, end: int | None = None) -> tuple[int, int]:
    """Decode a base-128 varint at buf[pos]; returns (value, new_pos)."""
    end = len(buf) if end is None else end
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Truncated
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def parse_proto(buf: bytes) -> dict[int, list]:
    """Decode one protobuf message into {field_number: [values...]}.

    Varints come back as int, fixed32/fixed64 as int, length-delimited fields as bytes (the caller
    knows which are sub-messages). Unknown fields are kept; a malformed buffer raises _Truncated.
    """
    fields: dict[int, list] = {}
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = read_varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = read_varint(buf, pos)
        elif wire_type == 1:
            if pos + 8 > end:
                raise _Truncated
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > end:
                raise _Truncated
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire_type == 5:
            if pos + 4 > end:
                raise _Truncated
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:  # groups (3, 4) are long deprecated and never written by TF
            raise _Truncated
        fields.setdefault(number, []).append(value)
    return fields


def _last(fields: dict[int, list], number: int, default=0):
    """Protobuf semantics: the last occurrence of a scalar field wins; absent = default."""
    values = fields.get(number)
    return values[-1] if values else default


@dataclass(frozen=True)
class BundleEntry:
    """One tensor's BundleEntryProto (tensorflow/core/protobuf/tensor_bundle.proto)."""

    name: str
    dtype: int  # field 1, DataType enum
    shape: tuple[int, ...]  # field 2, TensorShapeProto.dim[].size
    shard_id: int  # field 3
    offset: int  # field 4, byte offset in the shard
    size: int  # field 5, byte length
    crc32c: int  # field 6, masked crc32c of the bytes
    n_slices: int  # field 7, repeated TensorSliceProto: partitioned variable if > 0


def parse_entry(name: str, raw: bytes) -> BundleEntry:
    f = parse_proto(raw)
    shape: list[int] = []
    shape_raw = _last(f, 2, b"")
    if shape_raw:
        shape_f = parse_proto(shape_raw)
        if _last(shape_f, 3, 0):  # unknown_rank
            raise _Truncated
        for dim_raw in shape_f.get(2, []):
            size = _last(parse_proto(dim_raw), 1, 0)
            if size >= 1 << 63:  # int64 on the wire: -1 means unknown
                raise _Truncated
            shape.append(size)
    return BundleEntry(name=name, dtype=_last(f, 1), shape=tuple(shape), shard_id=_last(f, 3),
                       offset=_last(f, 4), size=_last(f, 5), crc32c=_last(f, 6),
                       n_slices=len(f.get(7, [])))


# ---------------------------------------------------------------------------------------------
# the LevelDB-style table
# ---------------------------------------------------------------------------------------------
def _read_block(data: bytes, offset: int, size: int, what: str, path: Path) -> bytes:
    """Return a block's contents after checking bounds, compression type and crc."""
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(data) - FOOTER_SIZE:  # blocks and trailers precede the footer
        raise BundleError(f"{path}: {what} at offset {offset} (size {size}) runs past the end of "
                          f"the file ({len(data)} bytes); the index is truncated or damaged, download it again")
    contents = data[offset:end]
    block_type = data[end]
    (stored,) = struct.unpack_from("<I", data, end + 1)
    if unmask_crc(stored) != crc32c(data[offset:end + 1]):
        raise BundleError(f"{path}: crc32c mismatch in {what} at offset {offset} (size {size}); "
                          "the index file is corrupted, download it again")
    if block_type == SNAPPY_COMPRESSION:
        raise BundleError(f"{path}: {what} at offset {offset} is snappy-compressed, which this reader "
                          "does not support (TensorFlow's bundle writer never compresses)")
    if block_type != NO_COMPRESSION:
        raise BundleError(f"{path}: {what} at offset {offset} has unknown compression type {block_type}")
    return contents


def _block_entries(block: bytes, what: str, path: Path) -> list[tuple[bytes, bytes]]:
    """Decode the (key, value) pairs of one block, undoing the prefix compression."""
    def bad(reason: str) -> BundleError:
        return BundleError(f"{path}: malformed {what}: {reason}; the index file is damaged, download it again")

    if len(block) < 4:
        raise bad("shorter than its restart count")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    entries_end = len(block) - 4 * (n_restarts + 1)
    if entries_end < 0:
        raise bad(f"{n_restarts} restart points do not fit in {len(block)} bytes")
    restarts = set(struct.unpack_from(f"<{n_restarts}I", block, entries_end))
    if any(r >= max(entries_end, 1) for r in restarts):
        raise bad("restart point past the entries")
    out: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    try:
        while pos < entries_end:
            entry_start = pos
            shared, pos = read_varint(block, pos, entries_end)
            non_shared, pos = read_varint(block, pos, entries_end)
            value_len, pos = read_varint(block, pos, entries_end)
            if shared > len(key) or pos + non_shared + value_len > entries_end:
                raise _Truncated
            if entry_start in restarts and shared != 0:
                raise bad(f"restart entry at byte {entry_start} shares a key prefix")
            key = key[:shared] + block[pos:pos + non_shared]
            pos += non_shared
            out.append((key, block[pos:pos + value_len]))
            pos += value_len
    except _Truncated:
        raise bad(f"entry at byte {entry_start} runs past the end of the block") from None
    return out


def _data_block_handles(data: bytes, path: Path) -> list[tuple[str, int, int]]:
    """[("data block N", offset, size)] from the footer and the index block (both crc-checked)."""
    footer = data[-FOOTER_SIZE:]
    try:
        meta_off, p = read_varint(footer, 0, 40)
        meta_size, p = read_varint(footer, p, 40)
        index_off, p = read_varint(footer, p, 40)
        index_size, p = read_varint(footer, p, 40)
    except _Truncated:
        raise BundleError(f"{path}: unreadable footer block handles; the index is damaged") from None
    _read_block(data, meta_off, meta_size, "metaindex block", path)  # empty for bundles; crc-checked
    index_block = _read_block(data, index_off, index_size, "index block", path)
    handles = []
    for block_no, (_separator, handle) in enumerate(_block_entries(index_block, "index block", path)):
        try:
            off, p = read_varint(handle, 0)
            size, _ = read_varint(handle, p)
        except _Truncated:
            raise BundleError(f"{path}: unreadable handle for data block {block_no} in the index block") from None
        handles.append((f"data block {block_no}", off, size))
    return handles


def data_block_handles(path: str | Path) -> list[tuple[str, int, int]]:
    """Where the data blocks of an index file are: [("data block N", offset, size)] (for tools and tests)."""
    path = Path(path)
    return _data_block_handles(path.read_bytes(), path)


def read_index(path: str | Path) -> tuple[dict, dict[str, BundleEntry]]:
    """Parse model.ckpt.index into (header fields, {tensor name: BundleEntry}), checking every crc."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: cannot read the checkpoint index ({e.strerror})") from None
    if len(data) < FOOTER_SIZE:
        raise BundleError(f"{path}: {len(data)} bytes is too short for a checkpoint index "
                          f"(footer alone is {FOOTER_SIZE}); the file is truncated, download it again")
    footer = data[-FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, 40)
    if magic != TABLE_MAGIC:
        raise BundleError(f"{path}: bad table magic 0x{magic:016x} (expected 0x{TABLE_MAGIC:016x}); "
                          "not a TensorFlow checkpoint index, or truncated")
    raw: dict[bytes, bytes] = {}
    for what, off, size in _data_block_handles(data, path):
        for key, value in _block_entries(_read_block(data, off, size, what, path), what, path):
            raw[key] = value

    if b"" not in raw:
        raise BundleError(f"{path}: no BundleHeaderProto (empty key); not a tensor bundle index")
    try:
        hf = parse_proto(raw.pop(b""))
    except _Truncated:
        raise BundleError(f"{path}: unreadable BundleHeaderProto") from None
    header = {"num_shards": _last(hf, 1), "endianness": _last(hf, 2)}
    try:  # VersionDef: producer=1, min_consumer=2. TF writes bundle version 1, min_consumer 0.
        min_consumer = _last(parse_proto(_last(hf, 3, b"")), 2, 0)
    except _Truncated:
        raise BundleError(f"{path}: unreadable bundle version in the BundleHeaderProto") from None
    if min_consumer > BUNDLE_VERSION:
        raise BundleError(f"{path}: written in tensor-bundle format version {min_consumer}, newer than the "
                          f"version {BUNDLE_VERSION} this reader understands")
    if header["endianness"] != 0:
        raise BundleError(f"{path}: big-endian tensor data is not supported")
    if header["num_shards"] != 1:
        raise BundleError(f"{path}: checkpoint has {header['num_shards']} data shards; this reader "
                          "supports the single-shard layout OpenAI ships (model.ckpt.data-00000-of-00001)")

    entries: dict[str, BundleEntry] = {}
    for key, value in raw.items():
        if key.startswith(b"\x00"):
            # A slice of a partitioned variable (TF encodes those keys with a leading NUL); its
            # full-variable entry carries `slices` and is refused by name when read.
            continue
        name = key.decode("utf-8", errors="replace")
        try:
            entries[name] = parse_entry(name, value)
        except _Truncated:
            raise BundleError(f"{path}: unreadable BundleEntryProto for tensor '{name}'") from None
    return header, entries


class TensorBundle:
    """A TF checkpoint opened read-only: `names()`, `shape(name)`, `read(name)` → float32 ndarray.

    `prefix` is the checkpoint path without suffix (".../model.ckpt"), as TF names it.
    Arrays returned by `read` are copy-on-write views of the memory-mapped shard: no RAM until
    used, writable without touching the file, and safe to hand to `torch.from_numpy`.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        self.index_path = Path(f"{self.prefix}.index")
        self.header, self.entries = read_index(self.index_path)
        self.data_path = Path(f"{self.prefix}.data-00000-of-{self.header['num_shards']:05d}")
        if not self.data_path.is_file():
            raise BundleError(f"{self.data_path}: data shard missing (the index lists "
                              f"{len(self.entries)} tensors stored there)")
        self._data_size = self.data_path.stat().st_size
        self._mmap: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)  # already sorted: the table is sorted by key

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def _data(self) -> np.memmap:
        if self._mmap is None:
            if self._data_size == 0:
                self._mmap = np.zeros(0, dtype=np.uint8)
            else:
                self._mmap = np.memmap(self.data_path, dtype=np.uint8, mode="c")
        return self._mmap

    def read(self, name: str, verify: bool = True, mmap: bool = True) -> np.ndarray:
        """The tensor's float32 array, after checking its crc32c when `verify`.

        mmap=True returns a copy-on-write view of the mapped shard (no RAM until touched: right
        for tensors used as they are). mmap=False reads the bytes into a fresh array instead, so
        a tensor that is about to be transposed (copied anyway) leaves no mapped pages behind.
        """
        e = self.entries.get(name)
        if e is None:
            raise BundleError(f"{self.index_path}: no tensor named '{name}'")
        where = f"{self.data_path}: tensor '{name}'"
        if e.n_slices:
            raise BundleError(f"{where} is a partitioned (sliced) variable, which this reader does not support")
        if e.dtype != DT_FLOAT:
            raise BundleError(f"{where} has dtype {DTYPE_NAMES.get(e.dtype, e.dtype)}; "
                              "only float32 checkpoints are supported")
        if e.shard_id != 0:
            raise BundleError(f"{where} lives in shard {e.shard_id}; only single-shard checkpoints are supported")
        n = int(np.prod(e.shape, dtype=np.int64))
        if e.size != 4 * n:
            raise BundleError(f"{where}: {e.size} bytes do not hold float32 shape {list(e.shape)}; index damaged")
        if e.offset + e.size > self._data_size:
            raise BundleError(f"{where} at bytes [{e.offset}, {e.offset + e.size}) runs past the end of "
                              f"the {self._data_size}-byte data file; it is truncated, download it again")
        if mmap:
            raw = self._data()[e.offset:e.offset + e.size]
        else:
            raw = np.empty(e.size, dtype=np.uint8)
            with open(self.data_path, "rb") as f:
                f.seek(e.offset)
                if f.readinto(memoryview(raw)) != e.size:
                    raise BundleError(f"{where}: short read from the data file; it changed while being read")
        if verify and crc32c_of_array(raw) != unmask_crc(e.crc32c):
            raise BundleError(f"{where}: crc32c mismatch, the data file is corrupted; download it again")
        return raw.view("<f4").reshape(e.shape)

    def close(self) -> None:
        # Arrays handed out keep their own reference to the mapping; dropping ours is enough.
        self._mmap = None

    def __enter__(self) -> "TensorBundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def checkpoint_prefix(folder: str | Path) -> Path:
    """Find the checkpoint prefix in a folder: the `checkpoint` file's model_checkpoint_path,
    else the single `*.index` file."""
    folder = Path(folder)
    ckpt_file = folder / "checkpoint"
    if ckpt_file.is_file():
        for line in ckpt_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model_checkpoint_path:"):
                rel = line.split(":", 1)[1].strip().strip('"')
                prefix = Path(rel) if Path(rel).is_absolute() else folder / rel
                if Path(f"{prefix}.index").is_file():
                    return prefix
                # An absolute path from another machine: fall back to the index next to it.
                local = folder / Path(rel).name
                if Path(f"{local}.index").is_file():
                    return local
    indexes = sorted(folder.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    if not indexes:
        raise BundleError(f"{folder}: no TensorFlow checkpoint index (*.index) found; expected "
                          "OpenAI's model.ckpt.index and model.ckpt.data-00000-of-00001")
    raise BundleError(f"{folder}: several checkpoint indexes ({', '.join(p.name for p in indexes)}) "
                      "and no `checkpoint` file saying which to use")
