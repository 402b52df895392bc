"""Shared by the train/checkpoint/CLI tests: the tiny config and a compile cache."""
import contextlib
import importlib.util
import os
import pathlib

import jax
from jax.experimental.compilation_cache import compilation_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_experiment(name: str):
  """experiments/NAME.py as a module (experiments/ is no package: loaded from its path)."""
  spec = importlib.util.spec_from_file_location(f"{name}_experiment", ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def experiment_config(name: str, arg: str = ""):
  """experiments/NAME.py's get_config(arg)."""
  return load_experiment(name).get_config(arg)


def tiny_config(**overrides):
  """experiments/shapes.py:tiny with dotted-key overrides, e.g. {"mesh.data": 8}."""
  config = experiment_config("shapes", "tiny")
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def compile_cache_dir(fallback) -> str:
  """The test session's compilation cache (tests/conftest.py), shared by both pytest workers and
  every CLI subprocess, so a program one module compiled is a cache hit in the next; `fallback`
  where no session cache is set."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(fallback)


@contextlib.contextmanager
def persistent_compile_cache(directory):
  """Repeated runs of one config compile once (each trainer.run jits afresh): every compile is
  cached, in the session's cache or else `directory`."""
  old_dir = jax.config.jax_compilation_cache_dir
  old_min = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", compile_cache_dir(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", old_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
    compilation_cache.reset_cache()
