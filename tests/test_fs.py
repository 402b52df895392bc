"""Workdir files on a non-local filesystem: every writer and reader round-trips through memory://."""
import json
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image

from tfx import fs, metrics, workdir as workdir_lib
from train_helpers import tiny_config


@pytest.fixture
def url():
  """A fresh memory:// workdir (fsspec's in-process object store: no append, no os.* calls)."""
  path = f"memory://tfx-{uuid.uuid4().hex[:8]}/run"
  yield path
  fsspec.filesystem("memory").rm(path.split("://")[1].split("/")[0], recursive=True)


def test_text_files_append_and_replace(url):
  path = fs.join(url, "a", "log.txt")
  assert path == url + "/a/log.txt" and not fs.is_local(path)
  fs.append_text(path, "one\n")  # parent folders appear as needed
  fs.append_text(path, "two\n")
  assert fs.read_text(path) == "one\ntwo\n"
  fs.write_text(path, "three\n")
  assert fs.read_text(path) == "three\n" and fs.listdir(fs.join(url, "a")) == ["log.txt"]


def test_local_write_is_atomic_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "x" / "f.json"
  fs.write_text(path, "{}")
  fs.append_text(path, "\n")
  assert path.read_text() == "{}\n" and fs.listdir(tmp_path / "x") == ["f.json"]


def test_config_json_on_an_object_store(url):
  config = tiny_config(**{"model.unet_channels": (8, 16, 32)})
  workdir_lib.check_writable(url)
  workdir_lib.save_config(url, config)
  assert workdir_lib.load_config(url).to_dict() == config.to_dict()
  workdir_lib.check_resumable(url, config)
  with pytest.raises(workdir_lib.IncompatibleWorkdirError):
    workdir_lib.check_resumable(url, tiny_config(**{"model.n_layers": 2}))
  assert fs.listdir(url) == ["config.json"]  # the write probe is gone


def _tensorboard_events(directory) -> list[tuple[str, int, float]]:
  """(tag, step, value) of every scalar in the event files under `directory`, read with fsspec."""
  from tensorboardX.proto import event_pb2
  out = []
  for name in fs.listdir(directory):
    data = fs.read_bytes(fs.join(directory, name))
    pos = 0
    while pos < len(data):
      (length,) = np.frombuffer(data[pos:pos + 8], np.uint64)
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + int(length)])
      pos += 12 + int(length) + 4
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value if v.HasField("simple_value")]
  return out


def test_metrics_samples_and_tensorboard_on_an_object_store(url):
  writer = metrics.MetricsWriter(url)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.write(2, {"eval_ppl_text": 5.0})
  grid = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  writer.write_image(3, "text_to_image", grid)
  writer.close()
  assert [r["step"] for r in metrics.read_metrics(url)] == [1, 2, 3, 2]
  with fs.open(fs.join(url, "samples", "text_to_image_00000003.png"), "rb") as f:
    np.testing.assert_array_equal(np.asarray(Image.open(f)), grid)
  events = _tensorboard_events(fs.join(url, "tensorboard"))
  assert ("train/loss", 3, pytest.approx(1 / 3)) in events and ("eval/ppl_text", 2, 5.0) in events

  resumed = metrics.MetricsWriter(url)  # a resume from step 1 drops the records after it
  resumed.drop_after(1)
  resumed.close()
  assert [r["step"] for r in metrics.read_metrics(url)] == [1]


def test_training_run_keeps_its_workdir_files_on_an_object_store(url, tmp_path, monkeypatch):
  """A tiny run on a memory:// workdir; Orbax (which has no memory:// backend) writes to local disk."""
  from tfx import checkpoint, trainer
  local, orbax_checkpointer = tmp_path / "orbax", checkpoint.Checkpointer
  monkeypatch.setattr(checkpoint, "Checkpointer", lambda workdir, **kw: orbax_checkpointer(local, **kw))
  config = tiny_config(**{"mesh.data": 8, "total_steps": 2, "sample_every_steps": 0})  # grids: test above
  last = trainer.run(config, url)
  assert last["step"] == 2
  assert fs.listdir(url) == ["config.json", "metrics.jsonl", "tensorboard"]
  assert workdir_lib.load_config(url).total_steps == 2
  assert [r["step"] for r in metrics.read_metrics(url)] == [1, 2]
  assert ("train/loss", 2, pytest.approx(last["loss"])) in _tensorboard_events(fs.join(url, "tensorboard"))
  assert sorted(p.name for p in local.iterdir()) == ["checkpoints"]
