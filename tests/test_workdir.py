"""The workdir's config.json: round trip, migration of old files, the resume check."""
import json

import pytest

from tfx import workdir as workdir_lib
from train_helpers import tiny_config


def test_config_json_round_trips_tuples(tmp_path):
  config = tiny_config(**{"model.unet_channels": (8, 16, 32)})
  workdir_lib.save_config(tmp_path, config)
  loaded = workdir_lib.load_config(tmp_path)
  assert loaded.model.unet_channels == (8, 16, 32)
  assert loaded.to_dict() == config.to_dict()


def test_old_config_json_gets_keys_added_since(tmp_path):
  raw = json.loads(tiny_config().to_json_best_effort())
  del raw["eval_every_steps"], raw["model"]["unet_channels"]  # as if saved before these keys existed
  (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(raw))
  loaded = workdir_lib.load_config(tmp_path)
  assert loaded.eval_every_steps == 0 and isinstance(loaded.model.unet_channels, tuple)


def test_resume_with_another_model_shape_is_refused(tmp_path):
  workdir_lib.check_resumable(tmp_path, tiny_config())  # no config.json yet: anything goes
  workdir_lib.save_config(tmp_path, tiny_config())
  workdir_lib.check_resumable(tmp_path, tiny_config(**{"total_steps": 99, "model.dtype": "bfloat16"}))
  with pytest.raises(workdir_lib.IncompatibleWorkdirError, match=r"model\.n_layers: 1 -> 2"):
    workdir_lib.check_resumable(tmp_path, tiny_config(**{"model.n_layers": 2}))
  with pytest.raises(workdir_lib.IncompatibleWorkdirError, match=r"image\.patch_size"):
    workdir_lib.check_resumable(tmp_path, tiny_config(**{"image.patch_size": 2}))


def test_resume_policy_refuses_unsafe_changes_unless_named(tmp_path):
  assert workdir_lib.check_config_change(tmp_path, tiny_config(**{"seed": 5})) == {}  # a new workdir
  workdir_lib.save_config(tmp_path, tiny_config())
  safe = tiny_config(**{"total_steps": 99, "log_every_steps": 3, "optim.end_lr": 0.0, "mesh.fsdp": 2})
  assert sorted(workdir_lib.check_config_change(tmp_path, safe)) == [
      "log_every_steps", "mesh.fsdp", "optim.end_lr", "total_steps"]
  for key, value in {"global_batch_size": 16, "seq_len": 64, "seed": 1, "data.text_weight": 0.2,
                     "optim.lr": 1.0, "model.dtype": "bfloat16"}.items():
    with pytest.raises(workdir_lib.IncompatibleWorkdirError, match=rf"\({key}: .* -> .*\).*"
                       rf"--allow_config_change={key} to accept"):
      workdir_lib.check_config_change(tmp_path, tiny_config(**{key: value}))
  moved = tiny_config(**{"global_batch_size": 16, "data.text_weight": 0.2, "total_steps": 99})
  changes = workdir_lib.check_config_change(tmp_path, moved, ["global_batch_size", "data."])
  assert workdir_lib.data_order_changed(changes) == ["data.text_weight", "global_batch_size"]
  assert workdir_lib.data_order_changed(workdir_lib.check_config_change(tmp_path, safe)) == []
  with pytest.raises(workdir_lib.IncompatibleWorkdirError, match="unknown config key.*batch"):
    workdir_lib.check_config_change(tmp_path, moved, ["batch"])


def test_config_json_keeps_each_change_with_its_time(tmp_path):
  first = tiny_config()
  workdir_lib.save_config(tmp_path, first)
  workdir_lib.save_config(tmp_path, first)  # an unchanged resume adds nothing
  assert workdir_lib.read_history(tmp_path) == []
  workdir_lib.save_config(tmp_path, tiny_config(**{"total_steps": 99}))
  workdir_lib.save_config(tmp_path, tiny_config(**{"total_steps": 99, "global_batch_size": 16}))
  history = workdir_lib.read_history(tmp_path)
  assert [h["changed"] for h in history] == [
      {"total_steps": [first.total_steps, 99]}, {"global_batch_size": [first.global_batch_size, 16]}]
  assert all(h["time"].endswith("+00:00") for h in history)
  assert workdir_lib.load_config(tmp_path).global_batch_size == 16  # the current config, history aside
