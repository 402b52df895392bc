"""All Orbax code: the train-state + data-iterator checkpoints under WORKDIR/checkpoints.

A checkpoint that fails to restore (a truncated or altered data file, a missing
item or metadata file, a broken iterator JSON, array data that differs from the
checksums saved with it, non-finite values) is skipped for the next older one; the
trainer moves it to WORKDIR/checkpoints_damaged/STEP.
A save that fails (disk full, quota, I/O error) raises CheckpointWriteError.
"""
import contextlib
import json
import logging
import os
import re
import sys
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "checkpoints_damaged"   # a sibling of checkpoints/: Orbax never lists or deletes it
CHECKSUMS_ITEM = "checksums"             # {"sum32": {leaf name: checksum}} beside the state item


class NoCheckpointError(FileNotFoundError):
  """The workdir holds no finished checkpoint."""


class DamagedCheckpointError(RuntimeError):
  """No checkpoint in the workdir restores (or one that was asked for does not)."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, quota, I/O error); earlier ones are untouched."""


def reason(error: BaseException) -> str:
  """An exception as one short line: the type and first message line of its root cause
  (tensorstore's read error, not Orbax's wrapper)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
  text = text if len(text) <= 200 else text[:197] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _os_cause(error: BaseException) -> str | None:
  """'No space left on device' etc. when `error` (or its cause) is an OS error, else None.

  Tensorstore reports OS errors as ValueError with `[os_error_code='28']` in the text.
  """
  while error is not None:
    if isinstance(error, OSError) and error.errno:
      return f"{error.strerror or os.strerror(error.errno)}" + (f" ({error.filename})" if error.filename else "")
    found = re.search(r"os_error_code='?(\d+)", str(error))
    if found:
      return os.strerror(int(found.group(1)))
    if isinstance(error, OSError):
      return str(error)
    error = error.__cause__ or error.__context__
  return None


def _chain_text(error: BaseException | None) -> str:
  texts = []
  while error is not None:
    texts.append(str(error))
    error = error.__cause__ or error.__context__
  return " ".join(texts)


class _QuietBackgroundErrors(logging.Filter):
  """Drops Orbax's logged errors: a failed background write is raised at the next save or wait,
  where the caller reports it in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if "orbax" in record.pathname:
      return False
    # asyncio's 'Task exception was never retrieved' for the failed write's fragment tasks, logged
    # whenever they are garbage collected (a CI run met it after the one-line report)
    return not (record.name == "asyncio" and "async_serialize" in record.getMessage())


class _ReadOnlyNotice(logging.Filter):
  """Drops Orbax's 'Given directory is read only' warning: tfx.sample, tfx.evaluate and each sweep
  evaluation open checkpoints read-only on purpose."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


def _filter_once(logger_name: str, kind: type) -> None:
  """Adds a `kind` filter to the logger unless one is there: it stays for the process."""
  logger = logging.getLogger(logger_name)
  if not any(isinstance(f, kind) for f in logger.filters):
    logger.addFilter(kind())


def _quiet_unraisable(previous):
  """A sys.unraisablehook that hides the 'Event loop is closed' noise of a failed async save."""
  if getattr(previous, "tfx_quiet", False):
    return previous

  def hook(unraisable):
    text = f"{unraisable.exc_value!r} {unraisable.object!r}"
    if "Event loop is closed" in text or "async_serialize" in text or "likely shutting down" in text:
      return
    previous(unraisable)
  hook.tfx_quiet = True
  return hook


def _all_finite(tree) -> bool:
  """True when every floating-point leaf of `tree` is finite (one jitted reduction).

  Single-process only: eager reductions over arrays spanning processes hung a
  2-process CPU run (tests/test_multihost.py), so multi-process restores skip the check.
  """
  if jax.process_count() > 1:
    return True
  floats = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(_every_leaf_finite(floats)) if floats else True


@jax.jit
def _every_leaf_finite(leaves):
  # one program for the whole state: per-leaf eager reductions ran ~100 small sharded
  # programs, each a collective whose device threads must all be scheduled in time
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def leaf_name(path) -> str:
  """A tree path as "a/b/c" (dict keys, attribute names and list indices alike)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def array_checksums(tree) -> dict[str, int] | None:
  """{leaf name: a 32-bit checksum of its bytes} for every array leaf of `tree`.

  Orbax keeps no checksum of array data and zstd's entropy-coded blocks carry none, so a
  bit flip in a data file can decode to other finite numbers (a CI run restored such a
  checkpoint and met a NaN loss one step later). The sum is over hashed
  (element, index) pairs in uint32, so it does not depend on the sharding or the order
  of reduction: a checkpoint saved on 8 devices verifies on 1. None with several
  processes, as for the finite check.
  """
  if jax.process_count() > 1:
    return None
  groups = {}  # one program per set of devices: a jit cannot mix them (an optimizer count on
  # device 0 beside params on the mesh), nor run under a context mesh of other devices
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(x, "dtype"):
      devices = frozenset(x.sharding.device_set) if isinstance(x, jax.Array) else None
      groups.setdefault(devices, []).append((leaf_name(path), x))
  sums = {}
  with jax.set_mesh(None):
    for flat in groups.values():
      values = np.asarray(_sum32_of_leaves([x for _, x in flat]))
      sums.update((name, int(v)) for (name, _), v in zip(flat, values))
  return dict(sorted(sums.items()))


def _mix32(z):
  # lowbias32 (C. Wellons' hash prospector): each input bit flips ~half of the output bits
  z = z ^ (z >> 16)
  z = z * jnp.uint32(0x7FEB352D)
  z = z ^ (z >> 15)
  z = z * jnp.uint32(0x846CA68B)
  return z ^ (z >> 16)


def _sum32(x):
  x = jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x, width)
  bits = bits.astype(jnp.uint32)  # a 64-bit leaf becomes two uint32 words on a new last axis
  # each element's flat index from iotas (no reshape, so no resharding), wrapping past 2^32
  index = jnp.zeros(bits.shape, jnp.uint32)
  for axis, size in enumerate(bits.shape):
    index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
  return jnp.sum(_mix32(bits ^ _mix32(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


@jax.jit
def _sum32_of_leaves(leaves):
  return jnp.stack([_sum32(x) for x in leaves])


def verify_checksums(tree, saved: dict[str, int]) -> None:
  """ValueError naming the first leaf of `tree` whose data differs from its saved checksum."""
  got = array_checksums(tree)
  for name, value in (got or {}).items():
    if name in saved and saved[name] != value:
      raise ValueError(f"the data of {name} differs from the checksum saved with it")


class _IteratorSnapshot:
  """The data iterator's state frozen at save time (the save itself may run later)."""

  def __init__(self, iterator):
    state = iterator.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  """Saves and restores {state, data iterator} under WORKDIR/checkpoints/<step>."""

  def __init__(self, workdir, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
    options = ocp.CheckpointManagerOptions(
        # read-only: the values Orbax would otherwise reset, each with a logged warning
        max_to_keep=keep if keep > 0 and not read_only else None,
        save_interval_steps=0 if read_only else 1, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only,
        # a save cut short (disk full, a kill) leaves STEP.orbax-checkpoint-tmp; the workdir lock
        # (tfx/lock.py) makes this trainer the only writer, so removing it at start is safe
        cleanup_tmp_directories=not read_only)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                CHECKSUMS_ITEM: ocp.JsonCheckpointHandler()}
    if read_only:
      _filter_once("absl", _ReadOnlyNotice)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._saving = None      # the step of the newest save started
    self._failed = None      # the CheckpointWriteError once a save failed
    # A failed async write is raised here, at the next save or wait; Orbax's threads also log
    # it with tracebacks, and asyncio prints pages of 'Event loop is closed' while it unwinds.
    # (The unraisable hook and the asyncio filter stay for the process: that noise can come at exit.)
    self._quiet = None if read_only else _QuietBackgroundErrors()
    if self._quiet is not None:
      logging.getLogger("absl").addFilter(self._quiet)
      # asyncio's reports come when the failed tasks are collected, possibly after close()
      _filter_once("asyncio", _QuietBackgroundErrors)
      sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)

  @classmethod
  def open_existing(cls, workdir) -> "Checkpointer":
    """A read-only Checkpointer; NoCheckpointError when WORKDIR holds no checkpoints folder."""
    if not (epath.Path(workdir) / CHECKPOINT_SUBDIR).exists():
      raise NoCheckpointError(f"no checkpoints in {workdir}: train first (python -m tfx.train)")
    return cls(workdir, read_only=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, items: dict, data_iterator=None, *, force: bool = True) -> bool:
    """Starts an (async) save of the state items and the iterator at `step`.

    CheckpointWriteError if this save, or the previous async one, failed to write.
    """
    args = {"state": ocp.args.PyTreeSave(items)}
    sums = array_checksums(items)
    if sums is not None:
      args[CHECKSUMS_ITEM] = ocp.args.JsonSave({"sum32": sums})
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
    with self._write_errors(step):
      return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    """Turns an OS error of a save (Orbax's own or tensorstore's) into one CheckpointWriteError."""
    if self._failed is not None:
      raise self._failed
    try:
      yield
      if step is not None:
        self._saving = step
    except Exception as e:  # noqa: BLE001 - only OS errors are translated, the rest re-raised
      cause = _os_cause(e)
      if cause is None:
        raise
      # an async save's error surfaces at the next save or wait: the tmp folder's name says which step
      named = re.search(r"/(\d+)\.orbax-checkpoint-tmp", _chain_text(e))
      failed = int(named.group(1)) if named else (step if step is not None else self._saving)
      kept = self._manager.latest_step()
      self._failed = CheckpointWriteError(
          f"saving the checkpoint at step {failed} under {self.directory} failed: {cause} "
          f"(the newest complete checkpoint: {'none' if kept is None else f'step {kept}'})")
      raise self._failed from None

  def restore(self, step: int, target: dict, data_iterator=None) -> dict:
    """Restores state items onto `target`'s shardings (any mesh); sets the iterator's state."""
    args = {"state": ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._restore_verified(step, args)

  def restore_subtree(self, step: int, target: dict) -> dict:
    """Restores only the keys present in `target` (e.g. just the params)."""
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return self._restore_verified(step, {"state": args})

  def _restore_verified(self, step: int, args: dict) -> dict:
    """The restored state item, its arrays checked against the checksums saved beside them
    (checkpoints written before tfx saved checksums, or by several processes, have none)."""
    has_sums = (self.directory / str(step) / CHECKSUMS_ITEM).exists()
    if has_sums:
      args = dict(args, **{CHECKSUMS_ITEM: ocp.args.JsonRestore()})
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    if has_sums:
      verify_checksums(restored["state"], restored[CHECKSUMS_ITEM]["sum32"])
    return restored["state"]

  def read(self, step: int) -> dict:
    """The state items at `step` as saved, without a target (for inspection and tests)."""
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore())
    return self._manager.restore(step, args=args)["state"]

  def saved_keys(self, step: int) -> set[str]:
    """Top-level keys of the saved state at `step`."""
    meta = self._manager.item_metadata(step)
    tree = meta["state"]
    tree = getattr(tree, "tree", tree)
    return set(tree.keys()) if tree else set()

  def saved_shapes(self, step: int, key: str) -> dict[str, tuple[int, ...]]:
    """Shape of every array under the saved state item `key` at `step`, by "a/b/c" path."""
    meta = self._manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)[key]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {leaf_name(path): tuple(leaf.shape) for path, leaf in flat}

  def reached_preemption(self, step: int) -> bool:
    """True when the JAX distributed runtime saw a preemption notice (multi-host)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Waits for the pending async save; CheckpointWriteError if it failed (once: later calls return)."""
    if self._failed is not None:
      return
    with self._write_errors(None):
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._quiet is not None:
      logging.getLogger("absl").removeFilter(self._quiet)
    if self._failed is None:  # after a failed async save, closing would raise its error again
      self._manager.close()

  def restore_newest(self, restore_one: Callable[[int], Any], *, report: Callable[[str], None],
                     move_aside: bool) -> tuple[int, Any] | None:
    """restore_one(step) on the newest checkpoint that restores with finite values; (step, result).

    Checkpoints newer than it that failed are reported in one line each and, with
    `move_aside`, moved to WORKDIR/checkpoints_damaged/STEP (never deleted). When every
    checkpoint fails, nothing moves (the cause may be this run, not the files) and
    DamagedCheckpointError names each failure. None when there is no checkpoint.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        result = restore_one(step)
        if not _all_finite(result):
          raise ValueError("non-finite values in the restored state")
      except Exception as e:  # noqa: BLE001 - any failure to read one checkpoint falls back to the next
        failures.append((step, reason(e)))
        continue
      for bad, why in failures:
        if move_aside:
          where = self.move_aside(bad)
          report(f"checkpoint at step {bad} is damaged ({why}); moved to {where}; using step {step}")
        else:
          report(f"checkpoint at step {bad} is damaged ({why}); using step {step} "
                 f"(the next tfx.train moves it aside)")
      return step, result
    if failures:
      raise DamagedCheckpointError(f"no checkpoint in {self.directory} restores: " +
                                   "; ".join(f"step {s}: {why}" for s, why in failures))
    return None

  def move_aside(self, step: int) -> epath.Path:
    """Moves checkpoint `step` to WORKDIR/checkpoints_damaged/STEP[.N] (a name Orbax ignores)."""
    damaged = self.directory.parent / DAMAGED_SUBDIR
    damaged.mkdir(parents=True, exist_ok=True)
    target, n = damaged / str(step), 1
    while target.exists():
      target, n = damaged / f"{step}.{n}", n + 1
    (self.directory / str(step)).rename(target)
    self._manager.reload()
    return target
