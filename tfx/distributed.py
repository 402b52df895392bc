"""Several processes as one JAX program: the CLIs' shared init, and host copies of global arrays.

`python -m tfx.train`, `tfx.sample` and `tfx.evaluate` take the same three flags
(`--coordinator_address`, `--num_processes`, `--process_id`) or none on a Cloud TPU VM,
where `jax.distributed` finds the pod itself.
"""
import glob
import importlib.util

import numpy as np

FLAG_HELP = {
    "coordinator_address": "multi-host: host:port of process 0",
    "num_processes": "multi-host: number of processes",
    "process_id": "multi-host: this process's index",
}


class DistributedError(ValueError):
  """Process flags that do not go together (a usage error: exit code 2)."""


def check_flags(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
  """All three process flags or none; 0 <= process_id < num_processes."""
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  missing = [name for name, value in given.items() if value is None or value == ""]
  if missing and len(missing) < len(given):
    have = [name for name in given if name not in missing]
    raise DistributedError(f"{' and '.join(have)} need{'s' if len(have) == 1 else ''} {' and '.join(missing)} "
                           "too (give all three process flags or none)")
  if missing:
    return
  if num_processes < 1:
    raise DistributedError(f"--num_processes must be >= 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise DistributedError(f"--process_id must be in [0, {num_processes}), got {process_id}")


def _on_cloud_tpu_vm() -> bool:
  """libtpu installed and TPU chips attached (launch/tpu_pod.sh passes no process flags)."""
  return (importlib.util.find_spec("libtpu") is not None
          and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """jax.distributed.initialize from the process flags (or auto-detected on a TPU pod); a no-op otherwise.

  Must run before anything touches a JAX backend. Raises DistributedError for flags that do not go together.
  """
  check_flags(coordinator_address, num_processes, process_id)
  import jax
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif _on_cloud_tpu_vm():
    jax.distributed.initialize()


def add_argparse_flags(parser) -> None:
  """The three process flags on an argparse parser (the train CLI defines them with absl)."""
  parser.add_argument("--coordinator_address", default=None, help=FLAG_HELP["coordinator_address"])
  parser.add_argument("--num_processes", type=int, default=None, help=FLAG_HELP["num_processes"])
  parser.add_argument("--process_id", type=int, default=None, help=FLAG_HELP["process_id"])


def is_chief() -> bool:
  """Process 0: the one that writes outputs."""
  import jax
  return jax.process_index() == 0


def chief_says(flag: bool) -> bool:
  """Process 0's `flag` on every process (a collective), e.g. whether it refused a check only it makes."""
  import jax
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def addressable(x):
  """`x` when this process holds all of it; else its whole value, gathered from every process.

  The gather is a collective: every process must call this for the same array, which they do
  when they run the same program (whether `x` spans processes is a property of its global sharding).
  """
  import jax
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
