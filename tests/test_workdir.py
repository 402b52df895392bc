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
