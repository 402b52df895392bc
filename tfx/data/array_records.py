"""Random access to ArrayRecord files through tfx.fs (fsspec): local disks and any URL.

array_record's own reader opens local files and gs:// only; this decoder reads
the same files through fsspec, so a dataset on memory://, s3://, gs:// (gcsfs,
the tfx[gcs] extra) ... is read like a local one (one ranged read a chunk); local
files with os.pread.
CPU time a local 32 KB latent record of tfx.data.bench, in random order: 43.2 us
here against 41.9 us through array_record's reader when zstd-compressed (most of
it zstd; tfx.data.builders writes latent caches uncompressed for that reason),
7.5 us against 15.1 us uncompressed.

The layout (array_record's layout.proto over Riegeli/records): the file's last
64 KiB block holds a postscript chunk (a RiegeliPostscript proto with the
footer's offset); the footer chunk holds a RiegeliFooterMetadata proto, then
one ArrayRecordFooter proto (chunk_offset, decoded_data_size, num_records) per
data chunk. A data chunk is a Riegeli "simple chunk with records": compression
byte (0 or zstd; brotli and snappy are refused), varint size of the compressed
record sizes, the sizes, the values. Every 64 KiB of the file a 24-byte block
header interrupts the chunks; reads cut them out. Hashes are not checked.
"""
import os

import numpy as np

from tfx import fs

_BLOCK = 1 << 16
_BLOCK_HEADER = 24
_CHUNK_HEADER = 40
_SIMPLE = 0x72    # 'r'
_NONE, _ZSTD = 0, 0x7A


def _varint(buf, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    if b < 0x80:
      return value, pos
    shift += 7


def _proto_ints(buf) -> dict[int, int]:
  """The varint fields of a small proto message (field number -> value); other wire types are skipped."""
  out, pos = {}, 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      out[field], pos = _varint(buf, pos)
    elif wire == 2:
      n, pos = _varint(buf, pos)
      pos += n
    elif wire == 1:
      pos += 8
    elif wire == 5:
      pos += 4
    else:
      raise ValueError(f"unexpected protobuf wire type {wire}")
  return out


def _decompress(kind: int, data, size: int):
  if kind == _NONE:
    return data
  if kind != _ZSTD:
    raise ValueError(f"ArrayRecord chunk compression {chr(kind)!r} is not supported (only none and zstd)")
  return _zstd().decompress(data, decompressed_size=size)


_codec = None


def _zstd():
  global _codec
  if _codec is None:
    import pyarrow   # tensorflow-datasets' dependency; its zstd is the one at hand without a new package
    _codec = pyarrow.Codec("zstd")
  return _codec


class ArrayRecordFile:
  """Records of one ArrayRecord file by index: len(f), f[i] -> bytes-like. Picklable (reopens per process)."""

  def __init__(self, path: str):
    self.path = str(path)
    self._local = fs.is_local(self.path)
    self.__setstate__({"path": self.path, "_local": self._local})
    size = self._size()
    if size < _BLOCK or size % _BLOCK:
      raise ValueError(f"{self.path} is not an ArrayRecord file (size {size} is not a multiple of 64 KiB)")
    postscript = self._records(size - _BLOCK, _BLOCK)
    footer_offset = _proto_ints(postscript[0]).get(1)
    if footer_offset is None:
      raise ValueError(f"{self.path}: ArrayRecord postscript without a footer offset")
    footer = self._records(footer_offset, size - _BLOCK - footer_offset)
    chunks = [_proto_ints(r) for r in footer[1:]]
    offsets = [c.get(1, 0) for c in chunks]
    counts = [c.get(3, 0) for c in chunks]
    self._group = max(counts, default=1)
    if any(n != self._group for n in counts[:-1]):
      raise ValueError(f"{self.path}: ArrayRecord chunks of unequal record counts {sorted(set(counts))}")
    # chunk c spans [offsets[c], offsets[c + 1]) (the last ends at the footer): one read per chunk
    self._spans = list(zip(offsets, [b - a for a, b in zip(offsets, offsets[1:] + [footer_offset])]))
    self._len = sum(counts)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_file", "_pid", "_cache")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._file, self._pid = None, None   # a local file's descriptor, opened on first read
    self._cache = (None, None)   # (chunk index, its records): a group's records decode once

  def __len__(self) -> int:
    return self._len

  def __del__(self, _close=os.close, _getpid=os.getpid):   # bound early: os may be gone at exit
    if getattr(self, "_file", None) is not None and self._pid == _getpid():
      _close(self._file)

  def _fd(self) -> int:
    if self._file is None or self._pid != os.getpid():   # a Grain worker process opens its own
      self._file, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
    return self._file

  def _size(self) -> int:
    return os.fstat(self._fd()).st_size if self._local else fs.size(self.path)

  def _pread(self, pos: int, n: int) -> bytes:
    data = os.pread(self._fd(), n, pos) if self._local else fs.read_range(self.path, pos, n)
    if len(data) != n:
      raise ValueError(f"{self.path}: truncated ArrayRecord file (wanted {n} bytes at {pos})")
    return data

  def _records(self, begin: int, span: int) -> list:
    """The records of the simple chunk at file position `begin`, which lies within `span` bytes."""
    raw = self._pread(begin, span)
    if (-begin) % _BLOCK < span:   # block headers inside: cut them out, last first
      raw = bytearray(raw)
      for at in reversed(range((-begin) % _BLOCK, span, _BLOCK)):
        del raw[at:at + _BLOCK_HEADER]
    data_size = int.from_bytes(raw[8:16], "little")
    chunk_type = raw[24]
    num_records = int.from_bytes(raw[25:32], "little")
    decoded_size = int.from_bytes(raw[32:40], "little")
    if chunk_type != _SIMPLE:
      raise ValueError(f"{self.path}: ArrayRecord chunk type {chr(chunk_type)!r} at {begin} is not supported")
    data = memoryview(raw)[_CHUNK_HEADER:_CHUNK_HEADER + data_size]
    kind = data[0]
    sizes_len, pos = _varint(data, 1)
    values = data[pos + sizes_len:]
    if kind != _NONE:
      n, p = _varint(values, 0)
      values = memoryview(_decompress(kind, values[p:], n)).cast("B")   # pyarrow's buffers hold signed chars
    if len(values) != decoded_size:
      raise ValueError(f"{self.path}: ArrayRecord chunk at {begin} decodes to {len(values)} bytes, "
                       f"its header says {decoded_size}")
    if num_records == 1:   # group_size 1 (tfds' setting): the values are the record
      return [values]
    sizes = data[pos:pos + sizes_len]
    if kind != _NONE:
      n, p = _varint(sizes, 0)
      sizes = memoryview(_decompress(kind, sizes[p:], n)).cast("B")
    out, p, start = [], 0, 0
    for _ in range(num_records):
      n, p = _varint(sizes, p)
      out.append(values[start:start + n])
      start += n
    return out

  def __getitem__(self, i: int) -> memoryview:
    """Record i as a read-only buffer (bytes(...) for a copy)."""
    if not 0 <= i < self._len:
      raise IndexError(f"record {i} of {self._len}")
    chunk, j = divmod(i, self._group)
    if self._cache[0] != chunk:
      self._cache = (chunk, self._records(*self._spans[chunk]))
    return self._cache[1][j]
