"""All Orbax code: the train-state + data-iterator checkpoints, and loading a model to sample."""
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from tfx import config as config_lib

CONFIG_FILE = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"
# Keys whose change alters param shapes or structure; a resume must keep them.
_SHAPE_IGNORED_MODEL_KEYS = {"dtype", "remat", "attention"}


class NoCheckpointError(FileNotFoundError):
  """The workdir holds no config.json or no finished checkpoint."""


class IncompatibleCheckpointError(ValueError):
  """A workdir's saved config differs from the requested one in model shape."""


# -- config.json ----------------------------------------------------------------

def _coerce_like(value, reference):
  """JSON turns tuples into lists; put them back where the default is a tuple."""
  if isinstance(reference, tuple) and isinstance(value, list):
    return tuple(value)
  return value


def config_from_dict(raw: dict) -> ml_collections.ConfigDict:
  """A ConfigDict from a JSON dict, with tuple-typed defaults restored and keys added
  since the run was saved filled from tfx.config.default() (whose defaults keep the
  behaviour of the code before the key existed)."""
  defaults = config_lib.default()

  def convert(node, ref):
    out = dict(ref) if isinstance(ref, dict) else {}
    for key, value in node.items():
      sub = ref.get(key) if isinstance(ref, dict) else None
      out[key] = convert(value, sub if sub is not None else {}) if isinstance(value, dict) \
          else _coerce_like(value, sub)
    return out

  return ml_collections.ConfigDict(convert(raw, defaults.to_dict()))


def load_config(workdir) -> ml_collections.ConfigDict:
  """Reads WORKDIR/config.json (raises NoCheckpointError if absent)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise NoCheckpointError(f"no {CONFIG_FILE} in {workdir}: not a tfx training workdir")
  return config_from_dict(json.loads(path.read_text()))


def save_config(workdir, config) -> None:
  """Writes WORKDIR/config.json (the resolved config of the run)."""
  path = epath.Path(workdir) / CONFIG_FILE
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _shape_keys(config) -> dict:
  c = config_from_dict(json.loads(config.to_json_best_effort()))
  keys = {f"model.{k}": v for k, v in c.model.items() if k not in _SHAPE_IGNORED_MODEL_KEYS}
  keys["image.patch_size"] = c.image.patch_size
  keys["image.resolution"] = c.image.resolution
  keys["autoencoder.latent_channels"] = c.autoencoder.latent_channels
  keys["autoencoder.downsample"] = c.autoencoder.downsample
  keys["optim.ema_decay>0"] = c.optim.ema_decay > 0
  return keys


def check_resumable(workdir, config) -> None:
  """Raises IncompatibleCheckpointError if WORKDIR/config.json has another model shape."""
  try:
    saved = load_config(workdir)
  except NoCheckpointError:
    return
  old, new = _shape_keys(saved), _shape_keys(config)
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if diff:
    changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
    raise IncompatibleCheckpointError(
        f"{workdir} holds a run with another model shape ({changes}); use a new --workdir")


# -- train-state checkpoints -----------------------------------------------------

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

  def reached_preemption(self, step: int) -> bool:
    """True when the JAX distributed runtime saw a preemption notice (multi-host)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


# -- loading a trained model for sampling / evaluation ------------------------------

def restore_model(workdir, step: int | None = None, *, ema: bool = True) -> tuple[Any, nnx.Module]:
  """Loads WORKDIR/config.json and a checkpoint's params (EMA if saved and `ema`) into a model."""
  from tfx import model as model_lib  # only sampling/eval need the model here

  config = load_config(workdir)
  directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
  if not directory.exists():
    raise NoCheckpointError(f"no checkpoints in {workdir}: train first (python -m tfx.train)")
  ckpt = Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.all_steps():
    have = ckpt.all_steps()
    raise NoCheckpointError(f"no checkpoint{'' if step is None else f' at step {step}'} in {directory}"
                            f" (available: {have or 'none'})")
  key = "ema" if ema and "ema" in ckpt.saved_keys(step) else "params"

  graphdefs = []

  def split():
    with nnx.use_eager_sharding(False):
      model = model_lib.build_model(config, nnx.Rngs(config.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    graphdefs.append(graphdef)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  abstract_params, _ = jax.eval_shape(split)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params)
  params = ckpt.restore_subtree(step, {key: target})[key]
  rest = jax.jit(lambda: split()[1])()  # non-Param variables are rebuilt, not stored
  ckpt.close()
  return config, nnx.merge(graphdefs[-1], params, rest)
