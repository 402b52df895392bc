"""Checkpoints: keep-N, the iterator saved with the state, restore_model for sampling."""
import json
import logging

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfx import checkpoint, restore, trainer, workdir as workdir_lib
from train_helpers import persistent_compile_cache, tiny_config


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset())


def test_iterator_state_is_taken_at_save_time_and_keep_n(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  it = _iterator()
  for step in (1, 2, 3):
    next(it)
    ckpt.save(step, {"w": jnp.full((3,), float(step))}, it)
  expected = next(it)  # advances past the step-3 save while it may still be writing
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  fresh = _iterator()
  restored = ckpt.restore(3, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, fresh)
  np.testing.assert_array_equal(restored["w"], [3.0, 3.0, 3.0])
  np.testing.assert_array_equal(next(fresh), expected)
  ckpt.close()


def test_checksums_do_not_depend_on_the_sharding_and_see_a_one_ulp_change():
  x_AB = jax.random.normal(jax.random.key(0), (64, 48))
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  tree = {"x": x_AB, "h": x_AB.astype(jnp.bfloat16), "step": jnp.int32(7), "flags": jnp.array([True, False])}
  sums = checkpoint.array_checksums(tree)
  sharded = {"x": jax.device_put(x_AB, jax.NamedSharding(mesh, jax.P("a", "b"))),
             "h": jax.device_put(tree["h"], jax.NamedSharding(mesh, jax.P(None, "a"))),
             "step": tree["step"], "flags": tree["flags"]}
  assert checkpoint.array_checksums(sharded) == sums
  with jax.set_mesh(mesh):  # leaves on one device beside leaves on the mesh, as the autoencoder saves
    assert checkpoint.array_checksums(dict(sharded, step=jax.device_put(tree["step"], jax.devices()[1]))) == sums
  one_ulp = x_AB.at[5, 7].set(jnp.nextafter(x_AB[5, 7], jnp.inf))
  swapped = x_AB.at[0, 0].set(x_AB[0, 1]).at[0, 1].set(x_AB[0, 0])  # same values, other places
  for changed in (one_ulp, swapped, x_AB.T.reshape(64, 48)):
    assert checkpoint.array_checksums({"x": changed})["x"] != sums["x"]
  assert checkpoint.array_checksums({"step": jnp.int32(8)})["step"] != sums["step"]


def test_data_that_differs_from_its_saved_checksum_does_not_restore(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=0)
  for step in (1, 2):
    ckpt.save(step, {"w": jnp.full((3,), float(step)), "opt": (jnp.zeros((2,)), {"mu": jnp.ones((2,))})})
  ckpt.wait()
  target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32),
            "opt": (jax.ShapeDtypeStruct((2,), jnp.float32), {"mu": jax.ShapeDtypeStruct((2,), jnp.float32)})}
  np.testing.assert_array_equal(ckpt.restore(2, target)["w"], [2.0] * 3)  # intact: verifies
  sums_file = tmp_path / "checkpoints" / "2" / checkpoint.CHECKSUMS_ITEM / "metadata"  # Orbax's JSON item file
  saved = json.loads(sums_file.read_text())
  assert sorted(saved["sum32"]) == ["opt/0", "opt/1/mu", "w"]
  saved["sum32"]["opt/1/mu"] ^= 1
  sums_file.write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="the data of opt/1/mu differs from the checksum saved with it"):
    ckpt.restore(2, target)
  with pytest.raises(ValueError, match="opt/1/mu differs"):  # readers restore subtrees: checked the same
    ckpt.restore_subtree(2, {"opt": target["opt"]})
  np.testing.assert_array_equal(ckpt.restore_subtree(2, {"w": target["w"]})["w"], [2.0] * 3)
  reports = []
  step, restored = ckpt.restore_newest(lambda s: ckpt.restore(s, target), report=reports.append, move_aside=False)
  assert step == 1 and float(restored["w"][0]) == 1.0
  assert len(reports) == 1 and "step 2 is damaged (ValueError: the data of opt/1/mu" in reports[0], reports
  ckpt.close()


def test_a_failed_writes_asyncio_reports_stay_quiet_after_close(tmp_path, caplog):
  """asyncio logs the failed write's unretrieved fragment tasks when they are collected, which can
  be after the one-line report and close(); only those records are dropped."""
  checkpoint.Checkpointer(tmp_path).close()
  log = logging.getLogger("asyncio")
  with caplog.at_level(logging.ERROR):
    log.error("Task exception was never retrieved\nfuture: <Task coro=<async_serialize_from_host.<locals>"
              ".write_fragment()> exception=ValueError('OUT_OF_RANGE: File too large')>")
    log.error("Task exception was never retrieved\nfuture: <Task coro=<user_code()>>")
  assert [r.getMessage().splitlines()[-1] for r in caplog.records] == ["future: <Task coro=<user_code()>>"]


def test_opening_read_only_logs_no_warnings(tmp_path, caplog):
  """tfx.sample/evaluate open checkpoints read-only on purpose: Orbax's notices of it are noise."""
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  ckpt.save(1, {"w": jnp.zeros((3,))})
  ckpt.wait()
  ckpt.close()
  with caplog.at_level(logging.WARNING):
    reader = checkpoint.Checkpointer.open_existing(tmp_path)
    assert reader.all_steps() == [1]
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_restore_model_errors_are_clear(tmp_path):
  with pytest.raises(workdir_lib.NotAWorkdirError, match="config.json"):
    restore.restore_model(tmp_path)
  workdir_lib.save_config(tmp_path, tiny_config())
  with pytest.raises(checkpoint.NoCheckpointError, match="no checkpoints"):
    restore.restore_model(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The tiny config trained for 4 steps with EMA, checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("trained")
  with persistent_compile_cache(tmp_path_factory.getbasetemp() / "jax_cache"):
    trainer.run(tiny_config(**{"mesh.data": 8}), workdir)
  return workdir


def _saved(workdir, step, key):
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  tree = ckpt.read(step)[key]
  ckpt.close()
  return tree


def assert_same_leaves(a, b):
  """Untargeted reads key layers by str, the model by int: compare leaves in order."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_model_loads_ema_or_raw_params(trained):
  config, model = restore.restore_model(trained)
  assert config.model.d_model == 32 and json.loads((trained / "config.json").read_text())["seed"] == 0
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ema, raw = _saved(trained, 4, "ema"), _saved(trained, 4, "params")
  assert_same_leaves(params, ema)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))

  _, model_raw = restore.restore_model(trained, step=2, ema=False)
  params_2 = nnx.to_pure_dict(nnx.state(model_raw, nnx.Param))
  assert_same_leaves(params_2, _saved(trained, 2, "params"))
  with pytest.raises(checkpoint.NoCheckpointError, match="step 3"):
    restore.restore_model(trained, step=3)


def test_restored_model_runs_a_forward_pass(trained):
  from tfx.data import pipeline
  config, model = restore.restore_model(trained)
  batch = {k: jnp.asarray(v) for k, v in next(pipeline.make_iterator(config)).items()}
  logits_BLV, patch_out_BLP, _ = model(batch, jnp.full(batch["tokens"].shape, 0.5))
  assert logits_BLV.shape[:2] == batch["tokens"].shape
  assert np.isfinite(np.asarray(logits_BLV)).all() and np.isfinite(np.asarray(patch_out_BLP)).all()
