"""tfx.data.array_records against array_record's own reader, on local files and memory://."""
import uuid

import fsspec
import numpy as np
import pytest
from array_record.python import array_record_module

from tfx import fs
from tfx.data import array_records


def _write(path, records, options):
  w = array_record_module.ArrayRecordWriter(str(path), options)
  for r in records:
    w.write(r)
  w.close()


@pytest.mark.parametrize("options", ["group_size:1", "group_size:3", "group_size:2,uncompressed"])
def test_reads_what_array_record_reads(tmp_path, options):
  rng = np.random.default_rng(0)
  # sizes from empty to past a 64 KiB block, so chunks and headers straddle block headers
  sizes = [0, 1, 7, 300, 40_000, 70_000, 5, 130_000, 64, 9]
  records = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() if i % 2 else bytes(n) + b"x" * (i % 3)
             for i, n in enumerate(sizes)]
  path = tmp_path / "f.array_record"
  _write(path, records, options)
  reference = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
  assert reference.read_all() == records
  url = f"memory://tfx-{uuid.uuid4().hex[:8]}/f.array_record"
  fs.write_bytes(url, path.read_bytes())
  try:
    for f in (array_records.ArrayRecordFile(str(path)), array_records.ArrayRecordFile(url)):
      assert len(f) == len(records)
      for i in [3, 0, 9, 5, 6, 7, 1, 2, 4, 8]:   # out of order: random access
        assert bytes(f[i]) == records[i], (f.path, i)
      with pytest.raises(IndexError):
        f[len(records)]
  finally:
    fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)


def test_refuses_a_file_that_is_not_array_record(tmp_path):
  path = tmp_path / "x"
  path.write_bytes(b"not an array record file" * 10)
  with pytest.raises(ValueError, match="not an ArrayRecord file"):
    array_records.ArrayRecordFile(str(path))


def test_uncompressed_dataset_reads_like_the_compressed_one(tmp_path):
  from tfx.data import builders
  rng = np.random.default_rng(1)
  rows = [(f"{i}", {"latent": rng.normal(size=(8, 8, 4)).astype(np.float32), "caption": f"pair {i}"})
          for i in range(7)]
  features = builders.image_text_features(latent_shape=(8, 8, 4))
  for compress in (True, False):
    builders.write_dataset(builders.ImageText, str(tmp_path / str(compress)), features, {"train": lambda: rows},
                           compress=compress)
  files = {c: next((tmp_path / str(c)).rglob("*.array_record*")) for c in (True, False)}
  options = {c: array_record_module.ArrayRecordReader(str(f)).writer_options_string() for c, f in files.items()}
  assert "zstd" in options[True] and "uncompressed" in options[False]
  a, b = (builders.open_split(str(tmp_path / str(c)), "train") for c in (True, False))
  assert len(a) == len(b) == 7
  for i in range(7):
    assert bytes(a.raw(i)) == bytes(b.raw(i))
    np.testing.assert_array_equal(a[i]["latent"], b[i]["latent"])
