"""The XLA options the train step compiles with: on CPU when the config asks, dropped where XLA lacks them."""
import jax
import jax.numpy as jnp
import pytest

import ml_collections

from tfx import compile_options, step


@pytest.fixture
def fresh_cache():
  compile_options.for_backend.cache_clear()
  yield
  compile_options.for_backend.cache_clear()


def test_cpu_gets_the_ynn_dots_only_option_and_other_backends_none(fresh_cache):
  assert compile_options.for_backend("cpu") == {
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  assert compile_options.for_backend("gpu") == {}
  assert compile_options.for_backend("tpu") == {}
  on = ml_collections.ConfigDict({"cpu_ynnpack_dots_only": True})
  assert compile_options.train_step(on) == compile_options.for_backend(jax.default_backend())
  assert compile_options.train_step(ml_collections.ConfigDict({"cpu_ynnpack_dots_only": False})) == {}
  assert compile_options.train_step(ml_collections.ConfigDict()) == {}  # an older workdir's config


def test_an_option_this_xla_does_not_know_is_dropped(fresh_cache, monkeypatch):
  monkeypatch.setattr(compile_options, "CPU", {"xla_cpu_no_such_option": "1"})
  assert compile_options.for_backend("cpu") == {}


def test_the_train_step_is_compiled_with_the_options(monkeypatch):
  """An option XLA refuses makes the step's compile fail: the options reach the jit."""
  def add_one(state, batch):
    return state + 1, {"x": batch}
  config = ml_collections.ConfigDict({"cpu_ynnpack_dots_only": True})
  assert step.jit_train_step(add_one, None, None, config)(jnp.zeros(2), jnp.ones(2))[0].tolist() == [1.0, 1.0]
  monkeypatch.setattr(compile_options, "train_step", lambda c: {"xla_cpu_no_such_option": "1"})
  with pytest.raises(jax.errors.JaxRuntimeError, match="xla_cpu_no_such_option"):
    step.jit_train_step(add_one, None, None, config)(jnp.zeros(2), jnp.ones(2))
