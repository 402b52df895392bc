"""`python -m tfx.data.prepare`: JSONL + webdataset tars -> a dataset training reads; skips counted."""
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pytest
from PIL import Image

from tfx import record
from tfx.data import builders, pipeline, prepare
from data_testing import small_config

RED, GREEN = (220, 40, 40), (40, 180, 60)


def _png(size, color, mode="RGB") -> bytes:
  out = io.BytesIO()
  Image.new(mode, size, color).save(out, format="PNG")
  return out.getvalue()


def _jpg(size, color) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", size, color).save(out, format="JPEG")
  return out.getvalue()


def _wide_red_with_green_edges() -> bytes:
  """40x30: red centre, 5 green columns at each side (cut away by the center crop)."""
  a = np.zeros((30, 40, 3), np.uint8)
  a[:] = RED
  a[:, :5] = GREEN
  a[:, 35:] = GREEN
  out = io.BytesIO()
  Image.fromarray(a).save(out, format="PNG")
  return out.getvalue()


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  """JSONL: 4 good, 1 corrupt, 1 empty caption, 1 missing, 1 bad line; tar: 2 good, 1 corrupt, 1 empty, 1 uncaptioned."""
  d = tmp_path_factory.mktemp("raw")
  (d / "img").mkdir()
  files = {"a.png": _wide_red_with_green_edges(), "b.jpg": _jpg((100, 80), (40, 80, 220)),
           "c.png": _png((50, 50), 128, mode="L"), "d.png": _png((20, 20), (10, 20, 30, 0), mode="RGBA"),
           "e.png": b"this is not an image", "f.png": _png((20, 20), RED)}
  for name, data in files.items():
    (d / "img" / name).write_bytes(data)
  rows = [("img/a.png", "a wide red picture"), ("img/b.jpg", "a blue photo"), ("img/c.png", "a grey square"),
          ("img/d.png", "a transparent one"), ("img/e.png", "a corrupt file"), ("img/f.png", "   "),
          ("img/missing.png", "never there")]
  lines = [json.dumps({"image": i, "caption": c}) for i, c in rows] + ["{not json"]
  (d / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  with tarfile.open(d / "00000.tar", "w") as tar:
    members = {"00000.jpg": _jpg((64, 48), RED), "00000.txt": b"red shard image",
               "00001.png": _png((33, 33), GREEN), "00001.txt": b"green shard image",
               "00002.jpg": b"\xff\xd8 truncated", "00002.txt": b"broken",
               "00003.jpg": _jpg((16, 16), RED), "00003.txt": b"",
               "00004.jpg": _jpg((16, 16), GREEN)}
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return d


@pytest.fixture(scope="module")
def prepared(raw_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared") / "ds"
  proc = subprocess.run([sys.executable, "-m", "tfx.data.prepare", f"--input={raw_dir}", f"--output={out}",
                         "--resolution=16"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return out, proc.stdout


def test_counts_in_summary(prepared):
  _, stdout = prepared
  assert ("prepared 6 pairs (6 train, 0 validation); skipped: 2 corrupt images, 1 missing images, "
          "2 empty captions, 2 bad lines") in stdout


def test_images_are_rgb_center_cropped_and_resized(prepared):
  out, _ = prepared
  ds = builders.open_split(str(out), "train")
  got = {ds[i]["caption"].decode(): ds[i]["image"] for i in range(len(ds))}
  assert set(got) == {"a wide red picture", "a blue photo", "a grey square", "a transparent one",
                      "red shard image", "green shard image"}
  for image in got.values():
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  # The green side bands of the wide image are cropped away: what is left is red.
  assert np.abs(got["a wide red picture"].astype(int) - RED).max() <= 2
  assert (got["a grey square"] == 128).all()


def test_training_reads_the_prepared_dir(prepared):
  out, _ = prepared
  c = small_config()
  c.data.image_text = str(out)
  b = next(pipeline.make_iterator(c, process_index=0, process_count=1))
  record.check(b, c.seq_len, 48)
  assert (b["modality"] == record.IMAGE).any()


def test_validation_fraction_splits_pairs(raw_dir, tmp_path, capsys):
  assert prepare.main([f"--input={raw_dir}", f"--output={tmp_path / 'ds'}", "--resolution=8",
                       "--validation_fraction=0.5"]) == 0
  n_train = len(builders.open_split(str(tmp_path / "ds"), "train"))
  n_val = len(builders.open_split(str(tmp_path / "ds"), "validation"))
  assert n_train + n_val == 6 and n_val > 0
  assert f"({n_train} train, {n_val} validation)" in capsys.readouterr().out


def test_refuses_to_overwrite_and_rejects_unusable_input(raw_dir, tmp_path, capsys):
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("user data")
  assert prepare.main([f"--input={raw_dir}", f"--output={busy}"]) == 2
  assert "not empty" in capsys.readouterr().err
  assert os.listdir(busy) == ["keep.txt"]

  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "pairs.jsonl").write_text(json.dumps({"image": "nope.png", "caption": "x"}) + "\n")
  assert prepare.main([f"--input={bad}", f"--output={tmp_path / 'out'}"]) == 2
  assert "no usable image-caption pair" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tfx_prepare_")]

  assert prepare.main([f"--input={tmp_path / 'absent'}", f"--output={tmp_path / 'out2'}"]) == 2
  assert "does not exist" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    prepare.main([f"--output={tmp_path / 'out3'}"])
  assert e.value.code == 2


def test_building_a_dataset_leaves_nothing_in_the_system_temp_dir(tmp_path, monkeypatch):
  system_tmp = tmp_path / "system_tmp"
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
  examples = lambda: iter([("0", {"text": "one document"})])
  version_dir = builders.write_dataset(builders.PydocTopics, str(tmp_path / "ds"), builders.text_features(),
                                       {"train": examples})
  assert os.path.exists(os.path.join(version_dir, "dataset_info.json"))
  assert list(system_tmp.iterdir()) == [] and tempfile.tempdir == str(system_tmp)
  assert not os.path.exists(tmp_path / "ds" / ".downloads")
