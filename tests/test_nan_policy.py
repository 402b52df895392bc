"""optim.nan_policy through the trainer: "stop" never saves a state from a non-finite step (the
update included), "skip" discards such a step on device, counts it, and stops after a run of them."""
import jax
import numpy as np
import pytest

from tfx import checkpoint, loop, metrics, trainer
from tfx.data import pipeline
from train_helpers import persistent_compile_cache, tiny_config


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  with persistent_compile_cache(tmp_path_factory.getbasetemp() / "jax_cache"):
    yield


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) \
      if (workdir / "checkpoints").exists() else []


def _params(workdir, step):
  return checkpoint.Checkpointer(workdir, read_only=True).read(step)["params"]


def _finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


# An infinite learning rate: step 1's loss and gradient are finite, its update is not.
EXPLODING = {"mesh.data": 8, "optim.lr": 1e39, "optim.warmup_steps": 0, "checkpoint_every_steps": 1}


def test_stop_refuses_to_save_the_state_a_non_finite_update_made(tmp_path):
  with pytest.raises(metrics.NonFiniteLossError, match="update at step 1 made the parameters"):
    trainer.run(tiny_config(**EXPLODING), tmp_path)
  assert _steps(tmp_path) == []  # before: step 1's checkpoint held inf/NaN params


class _PoisonedAt:
  """The batches for the steps in `bad_steps` get NaN patches."""

  def __init__(self, inner, bad_steps):
    self.inner, self.bad_steps, self.count = inner, bad_steps, 0

  def __next__(self):
    batch, self.count = next(self.inner), self.count + 1
    return dict(batch, patches=np.full_like(batch["patches"], np.nan)) if self.count in self.bad_steps else batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)

  def start_prefetch(self):
    pass


# skip runs differ only in host-side settings, so they share one compiled step
SKIP = {"mesh.data": 8, "optim.nan_policy": "skip", "checkpoint_every_steps": 1, "keep_checkpoints": 4}


def _poisoned(*bad_steps):
  return lambda c, **kw: _PoisonedAt(pipeline.make_iterator(c, **kw), bad_steps)


def test_skip_discards_one_bad_batch_and_trains_on(tmp_path):
  config = tiny_config(**SKIP)
  poisoned = _poisoned(2)
  result = trainer.run(config, tmp_path, make_iterator=poisoned)
  assert result["step"] == 4 and np.isfinite(result["loss"])
  records = metrics.read_metrics(tmp_path)
  assert [r["skipped_steps"] for r in records] == [0, 1, 0, 0]
  assert not np.isfinite(records[1]["loss"])
  p1, p2, p3 = (_params(tmp_path, s) for s in (1, 2, 3))
  jax.tree.map(np.testing.assert_array_equal, p1, p2)  # step 2's update was discarded
  assert _finite(p3) and not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p3)))


def test_skip_stops_after_max_skips_in_row_having_saved_only_untouched_state(tmp_path):
  config = tiny_config(**SKIP, **{"optim.max_skips_in_row": 3})
  with pytest.raises(metrics.NonFiniteLossError, match="3 non-finite steps in a row.*the last at step 4"):
    trainer.run(config, tmp_path, make_iterator=_poisoned(2, 3, 4))
  assert _steps(tmp_path) == [1, 2, 3]  # saved before the streak reached 3; step 4 is not
  for step in (2, 3):
    jax.tree.map(np.testing.assert_array_equal, _params(tmp_path, 1), _params(tmp_path, step))


def test_guard_policy_is_checked_and_streaks_reset():
  with pytest.raises(ValueError, match="nan_policy must be one of"):
    loop.FiniteGuard("ignore")
  guard = loop.FiniteGuard("skip", 2)
  bad, good = {"loss": float("nan"), "finite": 0.0}, {"loss": 1.0, "finite": 1.0}
  for values in (bad, good, bad, good):
    guard.check(0, values)
  assert guard.take_skipped() == 2 and guard.take_skipped() == 0
  guard.check(5, bad)
  with pytest.raises(metrics.NonFiniteLossError, match="2 non-finite steps in a row"):
    guard.check(6, bad)
  with pytest.raises(trainer.ConfigError, match="max_skips_in_row must be >= 1"):
    trainer.validate(tiny_config(**{"optim.max_skips_in_row": 0}), "/tmp/unused")
