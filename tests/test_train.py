"""The training loop: optimizer, sharded state and step, exact resume, mesh change, NaN guard."""
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tfx import checkpoint, mesh as mesh_lib, metrics, optim, restore, state as state_lib, step as step_lib, trainer
from tfx.data import pipeline
from tfx.model import build_model
from train_helpers import persistent_compile_cache, tiny_config


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  with persistent_compile_cache(tmp_path_factory.getbasetemp() / "jax_cache"):
    yield


def losses_by_step(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}


# -- optimizer --------------------------------------------------------------------

def test_schedule_warmup_then_cosine_to_end_lr():
  o = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, end_lr=1e-4, schedule="cosine"))
  schedule = optim.learning_rate_schedule(o, total_steps=110)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(60)), (1e-3 + 1e-4) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(110)), 1e-4, rtol=1e-5)
  short = optim.learning_rate_schedule(o, total_steps=4)  # warmup longer than the run
  assert 0 < float(short(3)) < 1e-3


def test_wsd_schedule_holds_lr_then_cools_down_as_one_minus_sqrt():
  o = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, end_lr=1e-4, schedule="wsd", decay_fraction=0.2))
  schedule = optim.learning_rate_schedule(o, total_steps=110)  # cooldown: the last 22 steps, from step 88
  np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
  for step in (10, 50, 88):
    np.testing.assert_allclose(float(schedule(step)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(88 + 22 // 4)), 1e-4 + 9e-4 * (1 - np.sqrt(5 / 22)), rtol=1e-5)
  np.testing.assert_allclose(float(schedule(110)), 1e-4, rtol=1e-5)
  for bad, message in ((dict(schedule="linear"), r"optim.schedule must be one of \('cosine', 'wsd'\), got 'linear'"),
                       (dict(decay_fraction=0.0), r"optim.decay_fraction must be in \(0, 1\], got 0.0")):
    with pytest.raises(ValueError, match=message):
      optim.learning_rate_schedule(ml_collections.ConfigDict({**o.to_dict(), **bad}), total_steps=110)


def test_weight_decay_skips_norms_biases_embeddings():
  params = {"embed": {"table": jnp.ones((8, 4))}, "lm_head": {"kernel": jnp.ones((4, 8))},
            "final_norm": {"scale": jnp.ones(4)}, "proj": {"bias": jnp.ones(4), "kernel": jnp.ones((4, 4))},
            "t_embed": {"fc1": {"kernel": jnp.ones((4, 4))}}}
  mask = optim.weight_decay_mask(params)
  assert mask == {"embed": {"table": False}, "lm_head": {"kernel": True}, "final_norm": {"scale": False},
                  "proj": {"bias": False, "kernel": True}, "t_embed": {"fc1": {"kernel": True}}}


# -- sharded state and step ------------------------------------------------------------

@pytest.fixture(scope="module")
def batches():
  config = tiny_config()
  iterator = pipeline.make_iterator(config)
  return config, [next(iterator) for _ in range(3)]


def _run_steps(config, mesh, batches):
  with jax.set_mesh(mesh):
    tx = optim.make_optimizer(config)
    factory = state_lib.StateFactory(config, tx, mesh, build_model)
    state = factory.init()
    shardings = {k: mesh_lib.batch_sharding(mesh, np.ndim(v)) for k, v in batches[0].items()}
    train_step = step_lib.jit_train_step(step_lib.train_step_fn(config, factory.graphdef, tx),
                                         factory.shardings, shardings, config)
    losses = []
    for batch in batches:
      state, m = train_step(state, jax.device_put(batch, shardings))
      losses.append(float(m["loss"]))
    return losses, state, factory


def test_mesh_2x2x2_matches_one_device_and_follows_the_rules(batches):
  config, data = batches
  one = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  eight = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  losses_1, state_1, _ = _run_steps(config, one, data)
  losses_8, state_8, factory = _run_steps(config, eight, data)
  np.testing.assert_allclose(losses_8, losses_1, atol=1e-4)
  assert losses_1[-1] != losses_1[0]  # it trained
  assert int(state_8.step) == 3
  # Every param (and its Adam moments) is laid out as the logical-axis rules say.
  with jax.set_mesh(eight):
    abstract = jax.eval_shape(lambda: nnx.split(
        build_model(config, nnx.Rngs(0)), nnx.Param, ...)[1])
  expected = nnx.to_pure_dict(mesh_lib.state_specs(abstract))
  actual = jax.tree.map(lambda a: a.sharding.spec, state_8.params)
  assert actual == expected
  assert any(spec != jax.sharding.PartitionSpec() for spec in jax.tree.leaves(actual))
  mu = state_8.opt_state[1][0].mu
  assert jax.tree.map(lambda a: a.sharding.spec, mu) == expected
  for a in jax.tree.leaves(state_8.params):
    assert dict(a.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_micro_batches_take_every_nth_row():
  x = jnp.arange(8 * 3).reshape(8, 3)
  micro = np.asarray(step_lib.split_micro_batches(x, 4))
  assert micro.shape == (4, 2, 3)
  for r in range(8):
    np.testing.assert_array_equal(micro[r % 4, r // 4], np.asarray(x[r]))
  with pytest.raises(ValueError, match="batch of 8 rows is not divisible by optim.grad_accum_steps=3"):
    step_lib.split_micro_batches(x, 3)


def test_grad_accumulation_equals_one_full_batch_step(batches):
  """4 micro-batches of 2 rows == one batch of 8 (loss, metrics, updated params), on a 2-way data mesh.

  Two steps: step 0's learning rate is 0 (warmup), step 1 moves the params."""
  config, data = batches
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=1)), jax.devices()[:2])
  results = {}
  for accum in (1, 4):
    c = tiny_config(**{"optim.grad_accum_steps": accum})
    with jax.set_mesh(mesh):
      tx = optim.make_optimizer(c)
      factory = state_lib.StateFactory(c, tx, mesh, build_model)
      shardings = {k: mesh_lib.batch_sharding(mesh, np.ndim(v)) for k, v in data[0].items()}
      step = step_lib.jit_train_step(step_lib.train_step_fn(c, factory.graphdef, tx), factory.shardings,
                                     shardings, c)
      batch = jax.device_put(data[0], shardings)
      if accum > 1:  # the micro-batch split keeps every row on its device: no all-to-all / permute
        hlo = step.lower(factory.init(), batch).compile().as_text()
        assert "all-to-all" not in hlo and "collective-permute" not in hlo
      state, _ = step(factory.init(), batch)
      state, metrics = step(state, jax.device_put(data[1], shardings))
      results[accum] = (jax.device_get(metrics), jax.device_get(state.params))
  (m1, p1), (m4, p4) = results[1], results[4]
  assert m1["images"] > 4 and m1["text_tokens"] > 50
  for key in m1:
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  moved = 0.0
  init = jax.device_get(factory.init().params)
  for a, b, p0 in zip(jax.tree.leaves(p4), jax.tree.leaves(p1), jax.tree.leaves(init)):
    np.testing.assert_allclose(a, b, atol=1e-5)
    moved = max(moved, float(np.abs(b - p0).max()))
  assert moved > 1e-4  # the update is not empty


def test_grad_accum_steps_must_divide_the_batch(tmp_path):
  with pytest.raises(trainer.ConfigError, match="batch_size 8 is not divisible by optim.grad_accum_steps 3"):
    trainer.validate(tiny_config(**{"optim.grad_accum_steps": 3}), tmp_path)
  with pytest.raises(trainer.ConfigError, match="micro-batches of 2 rows .* data-parallel size 8"):
    trainer.validate(tiny_config(**{"optim.grad_accum_steps": 4, "mesh.data": 8}), tmp_path)


def test_bfloat16_compute_keeps_float32_params_and_moments():
  config = tiny_config(**{"model.dtype": "bfloat16"})
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  with jax.set_mesh(mesh):
    factory = state_lib.StateFactory(config, optim.make_optimizer(config), mesh, build_model)
  dtypes = {a.dtype for a in jax.tree.leaves((factory.abstract.params, factory.abstract.ema))}
  moments = {a.dtype for a in jax.tree.leaves(factory.abstract.opt_state) if a.ndim}
  assert dtypes == moments == {jnp.dtype(jnp.float32)}


# -- the loop: resume, mesh change, NaN ------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """4 steps on mesh (8,1,1), never stopped: the reference run."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = trainer.run(tiny_config(**{"mesh.data": 8}), workdir)
  return workdir, result


def test_run_writes_config_metrics_checkpoints(uninterrupted):
  workdir, result = uninterrupted
  assert result["step"] == 4 and np.isfinite(result["loss"])
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["total_steps"] == 4 and saved["model"]["d_model"] == 32
  records = metrics.read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for key in ("loss", "lm_loss", "diff_loss", "grad_norm", "lr", "tokens_per_sec", "data_wait_s"):
    assert key in records[-1], key
  assert all(r["data_wait_s"] >= 0 for r in records)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


class _SigtermBefore:
  """Wraps an iterator; sends this process SIGTERM while fetching the batch of step `step`."""

  def __init__(self, inner, step):
    self.inner, self.step, self.count = inner, step, 0

  def __next__(self):
    self.count += 1
    if self.count == self.step:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)

  def start_prefetch(self):
    pass


def test_sigterm_saves_and_resume_is_exact_even_on_another_mesh(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  config = tiny_config(**{"mesh.data": 8, "checkpoint_every_steps": 0})
  preempted = lambda c, **kw: _SigtermBefore(pipeline.make_iterator(c, **kw), step=2)
  first = trainer.run(config, tmp_path / "a", make_iterator=preempted)
  assert first["step"] == 2  # finished step 2, saved, exited cleanly
  assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
  shutil.copytree(tmp_path / "a", tmp_path / "b")

  resumed = trainer.run(config, tmp_path / "a")
  assert resumed["step"] == 4
  assert losses_by_step(tmp_path / "a") == losses_by_step(reference)  # the same floats
  _, model_a = restore.restore_model(reference, ema=False)
  _, model_b = restore.restore_model(tmp_path / "a", ema=False)
  for a, b in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The step-2 checkpoint written on mesh (8,1,1) restores on (2,4,1) and trains on.
  trainer.run(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4}), tmp_path / "b")
  got, want = losses_by_step(tmp_path / "b"), losses_by_step(reference)
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in (3, 4)], [want[s] for s in (3, 4)], atol=1e-4)


def test_profile_steps_write_a_trace_tensorboard_finds(tmp_path):
  trainer.run(tiny_config(**{"mesh.data": 8, "profile_start_step": 1, "profile_steps": 2,
                             "checkpoint_every_steps": 0}), tmp_path)
  traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 1000
  assert b"train_step" in traces[0].read_bytes()  # the traced window holds the jitted step


class _PoisonedAt:
  """Wraps a checkpointable iterator; the batch for step `bad_step` gets NaN patches."""

  def __init__(self, inner, bad_step):
    self.inner, self.bad_step, self.count = inner, bad_step, 0

  def __next__(self):
    batch = next(self.inner)
    self.count += 1
    if self.count == self.bad_step:
      batch = dict(batch, patches=np.full_like(batch["patches"], np.nan))
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)

  def start_prefetch(self):
    pass


class _Slow(_PoisonedAt):
  """Wraps a checkpointable iterator; each batch takes `seconds` longer."""

  def __init__(self, inner, seconds):
    super().__init__(inner, bad_step=-1)
    self.seconds = seconds

  def __next__(self):
    import time
    time.sleep(self.seconds)
    return super().__next__()


def test_metrics_log_the_time_each_step_waited_for_data(uninterrupted, tmp_path):
  slow = lambda c, **kw: _Slow(pipeline.make_iterator(c, **kw), seconds=0.3)
  trainer.run(tiny_config(**{"mesh.data": 8}), tmp_path, make_iterator=slow)
  waits = {r["step"]: r["data_wait_s"] for r in metrics.read_metrics(tmp_path)}
  fast = {r["step"]: r["data_wait_s"] for r in metrics.read_metrics(uninterrupted[0])}
  assert sorted(waits) == [1, 2, 3, 4] and all(w >= 0.3 for w in waits.values()), waits
  assert all(w < 0.3 for w in fast.values()), fast


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
  config = tiny_config(**{"mesh.data": 8})
  poisoned = lambda c, **kw: _PoisonedAt(pipeline.make_iterator(c, **kw), bad_step=3)
  with pytest.raises(metrics.NonFiniteLossError, match="step 3"):
    trainer.run(config, tmp_path, make_iterator=poisoned)
  assert [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == [2]
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2]
  _, model = restore.restore_model(tmp_path, ema=False)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def test_periodic_eval_sees_the_ema_params_and_is_logged(tmp_path, monkeypatch):
  from tfx.eval import evaluator
  seen = []

  def fake_run(self, model):
    seen.append((len(seen), np.asarray(model.final_norm.scale[...]).copy()))
    return {"eval_marker": float(2 * len(seen))}

  monkeypatch.setattr(evaluator.Evaluator, "run", fake_run)
  trainer.run(tiny_config(**{"mesh.data": 8, "eval_every_steps": 2}), tmp_path)
  assert len(seen) == 2
  records = [r for r in metrics.read_metrics(tmp_path) if "eval_marker" in r]
  assert [(r["step"], r["eval_marker"]) for r in records] == [(2, 2.0), (4, 4.0)]
  ema = checkpoint.Checkpointer(tmp_path, read_only=True).read(4)["ema"]
  np.testing.assert_array_equal(seen[-1][1], ema["final_norm"]["scale"])


# -- metrics -------------------------------------------------------------------------

def test_delayed_fetch_hands_back_the_previous_step():
  fetch = metrics.DelayedFetch()
  assert fetch.push(1, {"loss": jnp.float32(2.0)}) is None
  assert fetch.push(2, {"loss": jnp.float32(1.5)}) == (1, {"loss": 2.0})
  assert fetch.flush() == (2, {"loss": 1.5})
  assert fetch.flush() is None


def test_nonfinite_loss_names_the_step():
  metrics.check_finite(3, {"loss": 1.0})
  with pytest.raises(metrics.NonFiniteLossError, match="loss is nan at step 7"):
    metrics.check_finite(7, {"loss": float("nan")})
  with pytest.raises(metrics.NonFiniteLossError, match="inf at step 2"):
    metrics.check_finite(2, {"loss": float("inf")})


def test_mfu_only_with_a_known_peak():
  class Device:
    device_kind = "NVIDIA H100 80GB HBM3"
  assert metrics.peak_flops(Device()) == 989e12
  assert metrics.peak_flops(jax.devices()[0]) is None  # CPU: no MFU
  meter = metrics.Throughput(tokens_per_step=1000, step_flops=lambda m: 1e9 * m["text_tokens"], num_devices=2,
                             device=Device())
  assert meter.update(0, {"text_tokens": 3.0}) == {}
  out = meter.update(10, {"text_tokens": 3.0})
  np.testing.assert_allclose(out["mfu"], out["steps_per_sec"] * 3e9 / (2 * 989e12))
  np.testing.assert_allclose(out["tokens_per_sec"], out["steps_per_sec"] * 1000)


def test_writer_appends_jsonl_and_drops_records_past_a_resume(tmp_path, capsys):
  writer = metrics.MetricsWriter(tmp_path)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.drop_after(2)
  writer.write(3, {"loss": 0.25})
  writer.close()
  assert metrics.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
                                            {"step": 3, "loss": 0.25}]
  metrics.Progress(100).report(40, {"loss": 0.5, "steps_per_sec": 2.0})
  assert "step 40/100  loss 0.5000  2.00 steps/s  ETA 0:00:30" in capsys.readouterr().err
