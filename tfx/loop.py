"""Pieces both training loops (tfx/trainer.py, tfx/train_autoencoder.py) share: the
non-finite guard (a flag computed inside the jitted step, a policy on the host) and
preemption handling (SIGTERM -> save and stop)."""
import contextlib
import math
import signal
import threading

import jax
import jax.numpy as jnp

from tfx import metrics as metrics_lib

NAN_POLICIES = ("stop", "skip")


# -- inside the jitted step (pure) -------------------------------------------------------

def all_finite(tree) -> jax.Array:
  """bool scalar: every float leaf of `tree` is free of NaN and Inf (one fused reduction each)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def keep_if_finite(finite: jax.Array, new, old):
  """`new` where the step was finite, else `old`: a non-finite update is discarded on device."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


# -- on the host -------------------------------------------------------------------------

class FiniteGuard:
  """Applies optim.nan_policy to each fetched step's metrics (which hold the step's `finite` flag).

  "stop": the first non-finite step raises NonFiniteLossError, so no state from it or after it
  is ever saved. "skip": the step already kept its old state (keep_if_finite); it is counted,
  and `max_skips_in_row` consecutive skips raise.
  """

  def __init__(self, policy: str = "stop", max_skips_in_row: int = 10):
    if policy not in NAN_POLICIES:
      raise ValueError(f"optim.nan_policy must be one of {NAN_POLICIES}, got {policy!r}")
    if max_skips_in_row < 1:
      raise ValueError(f"optim.max_skips_in_row must be >= 1, got {max_skips_in_row}")
    self.policy, self.max_skips_in_row = policy, max_skips_in_row
    self.in_row = 0
    self.skipped = 0  # since the last take_skipped()

  def check(self, step: int, values: dict) -> None:
    if values.get("finite", 1.0) and math.isfinite(values["loss"]) and math.isfinite(values.get("grad_norm", 0.0)):
      self.in_row = 0
      return
    if self.policy == "stop":
      metrics_lib.check_finite(step, values)
      if not math.isfinite(values.get("grad_norm", 0.0)):
        raise metrics_lib.NonFiniteLossError(f"gradient norm is not finite at step {step}; stopping")
      raise metrics_lib.NonFiniteLossError(
          f"the update at step {step} made the parameters or optimizer state non-finite; stopping "
          "(the last checkpoint before it is intact)")
    self.in_row += 1
    self.skipped += 1
    if self.in_row >= self.max_skips_in_row:
      raise metrics_lib.NonFiniteLossError(
          f"{self.in_row} non-finite steps in a row (optim.nan_policy='skip', optim.max_skips_in_row="
          f"{self.max_skips_in_row}), the last at step {step}; stopping (the last checkpoint is intact)")

  def take_skipped(self) -> int:
    """Steps skipped since the previous call (logged as skipped_steps)."""
    n, self.skipped = self.skipped, 0
    return n


@contextlib.contextmanager
def sigterm_flag():
  """Yields an Event set on SIGTERM (preemption), so the loop can save and exit cleanly.

  Multi-process runs leave SIGTERM to jax.distributed's preemption service, which
  makes every host agree on the step to stop at (Checkpointer.reached_preemption).
  """
  event = threading.Event()
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    yield event
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
  try:
    yield event
  finally:
    signal.signal(signal.SIGTERM, previous)


def preempted(checkpointer, event: threading.Event, step: int) -> bool:
  """Whether to save at `step` and stop: every host agrees across processes, else SIGTERM was seen."""
  return checkpointer.reached_preemption(step) if jax.process_count() > 1 else event.is_set()
