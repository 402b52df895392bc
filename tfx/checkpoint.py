"""All Orbax code: the train-state + data-iterator checkpoints under WORKDIR/checkpoints."""
import json

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_SUBDIR = "checkpoints"


class NoCheckpointError(FileNotFoundError):
  """The workdir holds no finished checkpoint."""


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
        max_to_keep=keep if keep > 0 else None, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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
    """Starts an (async) save of the state items and the iterator at `step`."""
    args = {"state": ocp.args.PyTreeSave(items)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
    return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, target: dict, data_iterator=None) -> dict:
    """Restores state items onto `target`'s shardings (any mesh); sets the iterator's state."""
    args = {"state": ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def restore_subtree(self, step: int, target: dict) -> dict:
    """Restores only the keys present in `target` (e.g. just the params)."""
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]

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
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}

  def reached_preemption(self, step: int) -> bool:
    """True when the JAX distributed runtime saw a preemption notice (multi-host)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
