"""A lean reader of serialized tf.train.Example protos: bytes features and packed float features.

Why: at the paper shape protobuf's parse plus numpy's copy out of a FloatList took
34 us of a 32 KB latent record (16 us parse, 18 us asarray; measured with the
machine loaded); this walks the few message headers in Python and views the
packed floats with np.frombuffer. Anything else (int64 lists, unpacked floats,
a missing feature) returns None and the caller parses with protobuf.
"""
import numpy as np

_BYTES, _FLOATS = 1, 2   # Feature's oneof field numbers (bytes_list, float_list)


def _varint(buf, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    if b < 0x80:
      return value, pos
    shift += 7


def _fields(buf, pos: int, end: int):
  """(field number, start, stop) of each length-delimited field in buf[pos:end]; None on other wire types."""
  out = []
  while pos < end:
    key, pos = _varint(buf, pos)
    if key & 7 != 2:
      return None
    n, pos = _varint(buf, pos)
    out.append((key >> 3, pos, pos + n))
    pos += n
  return out


def parse(buf, kinds: dict[str, str]) -> dict | None:
  """{name: bytes (kind "bytes", the first value) or float32 array view (kind "floats")} or None.

  `buf` is a bytes-like record; float arrays are read-only views into it.
  """
  buf = memoryview(buf)
  top = _fields(buf, 0, len(buf))
  if not top or top[0][0] != 1:
    return None
  entries = _fields(buf, top[0][1], top[0][2])
  if entries is None:
    return None
  out = {}
  for _, a, b in entries:   # map<string, Feature> entries: key = 1, value = 2
    kv = _fields(buf, a, b)
    if kv is None or len(kv) != 2:
      return None
    (_, ka, kb), (_, va, vb) = sorted(kv)
    name = bytes(buf[ka:kb]).decode("utf-8")
    kind = kinds.get(name)
    if kind is None:
      continue
    feature = _fields(buf, va, vb)
    if not feature or len(feature) != 1:
      return None
    which, la, lb = feature[0]
    values = _fields(buf, la, lb)   # the list's field 1: bytes values, or one packed float run
    if values is None:
      return None
    if kind == "bytes" and which == _BYTES and values:
      out[name] = bytes(buf[values[0][1]:values[0][2]])
    elif kind == "floats" and which == _FLOATS and len(values) <= 1:
      a2, b2 = (values[0][1], values[0][2]) if values else (la, la)
      out[name] = np.frombuffer(buf[a2:b2], "<f4")
    else:
      return None
  return out if len(out) == len(kinds) else None
