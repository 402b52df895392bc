"""Test setup: CPU only, 8 simulated devices, one compilation cache, shared across the suite."""
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 simulated devices; a collective waits up to 10 min for its 8 device threads instead of
# XLA's 40 s: on 2 loaded cores (two pytest workers plus the CLI tests' subprocesses) a
# participant can be descheduled that long, and XLA then aborts the whole process.
_flags = ("--xla_force_host_platform_device_count=8", "--xla_cpu_collective_call_terminate_timeout_seconds=600")
for _flag in _flags:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# One persistent compilation cache for the session: the pytest workers and the CLI tests'
# subprocesses (which inherit the environment) compile the same tiny programs again and again
# (a resumed run, the second process of a pair, the same config in another test). The
# controller makes it (workers inherit the variable) and removes it at the end.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tfx-tests-jax-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_unconfigure(config):
  if _OWN_CACHE is not None and not hasattr(config, "workerinput"):
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# The longest modules (the slowest in a serial run's --durations) start first: with 2 workers
# taking one module at a time in collection order, a long module collected last would run
# alone at the end.
_LONGEST_FIRST = ("test_paper_path.py", "test_multihost.py", "test_sweep.py", "test_chameleon.py",
                  "test_generate.py", "test_train.py", "test_multihost_cli.py", "test_sample_cli.py",
                  "test_faults.py", "test_evaluate_cli.py", "test_cli.py", "test_bench.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept
