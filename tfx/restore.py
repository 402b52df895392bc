"""A trained model for sampling and evaluation: WORKDIR/config.json + a checkpoint's params, on a mesh."""
import math
import sys
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfx import checkpoint as ckpt_lib
from tfx import mesh as mesh_lib
from tfx import model as model_lib
from tfx import workdir as workdir_lib

# What restore_model raises for a workdir or mesh it cannot load onto (the CLIs report it in one line).
RestoreError = (workdir_lib.NotAWorkdirError, ckpt_lib.NoCheckpointError, ckpt_lib.DamagedCheckpointError,
                mesh_lib.MeshError)


def parse_mesh(text: str) -> ml_collections.ConfigDict:
  """`data=2,fsdp=2,tensor=2` -> a config.mesh-like group; axes not named are 1, one may be -1 (fill)."""
  sizes = dict.fromkeys(mesh_lib.MESH_AXES, 1)
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, eq, value = part.partition("=")
    if name.strip() not in sizes or not eq:
      raise ValueError(f"{part!r} is not AXIS=SIZE with AXIS one of {', '.join(mesh_lib.MESH_AXES)}")
    try:
      sizes[name.strip()] = int(value)
    except ValueError:
      raise ValueError(f"{part!r}: size must be an integer") from None
  if any(s == 0 or s < -1 for s in sizes.values()) or list(sizes.values()).count(-1) > 1:
    raise ValueError(f"{text!r}: sizes must be positive, with at most one -1 (fill)")
  return ml_collections.ConfigDict(sizes)


def cli_mesh(mesh_config: ml_collections.ConfigDict | None) -> Mesh | None:
  """The mesh tfx.sample / tfx.evaluate restore onto: --mesh over the devices of every process.

  Without --mesh: None (the first device) in one process; with several, fsdp over all of
  their devices, since a computation must span every process to involve them all.
  """
  if mesh_config is None and jax.process_count() > 1:
    mesh_config = parse_mesh("fsdp=-1")
  return None if mesh_config is None else mesh_lib.make_mesh(mesh_config)


def checkpoint_steps(workdir) -> list[int]:
  """The steps of WORKDIR's finished checkpoints, ascending ([] when none)."""
  try:
    ckpt = ckpt_lib.Checkpointer.open_existing(workdir)
  except ckpt_lib.NoCheckpointError:
    return []
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def init_params(workdir, target: dict) -> dict:
  """The params (EMA if saved) of WORKDIR's latest checkpoint, restored onto `target`
  (ShapeDtypeStructs with shardings, as a train state's params). ValueError in one line
  when WORKDIR has no checkpoint or its params differ from `target` in names or shapes."""
  try:
    ckpt = ckpt_lib.Checkpointer.open_existing(workdir)
  except ckpt_lib.NoCheckpointError as e:
    raise ValueError(str(e)) from None
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ValueError(f"no finished checkpoint in {ckpt.directory}")
    key = "ema" if "ema" in ckpt.saved_keys(step) else "params"
    saved = ckpt.saved_shapes(step, key)
    flat = jax.tree_util.tree_flatten_with_path(target)[0]
    want = {ckpt_lib.leaf_name(path): tuple(leaf.shape) for path, leaf in flat}
    for name in sorted(set(saved) | set(want)):
      if saved.get(name) != want.get(name):
        raise ValueError(f"param {name} has shape {saved.get(name, 'none (absent)')} in {workdir} step {step} "
                         f"but {want.get(name, 'none (absent)')} in this config; the model must match")
    return ckpt.restore_subtree(step, {key: target})[key]
  finally:
    ckpt.close()


def _check_divides(abstract, shardings) -> None:
  """MeshError naming the first param whose sharded dimension the mesh axes do not divide."""
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(shardings)):
    for dim, axes in zip(leaf.shape, sharding.spec):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      parts = math.prod(sharding.mesh.shape[a] for a in axes)
      if dim % parts:
        name = ckpt_lib.leaf_name(path)
        raise mesh_lib.MeshError(f"mesh: param {name} {leaf.shape} has a dimension of {dim} that "
                                 f"{'x'.join(axes)} = {parts} devices do not divide; choose other --mesh sizes")


def restore_model(workdir, step: int | None = None, *, ema: bool = True,
                  mesh: Mesh | None = None) -> tuple[Any, nnx.Module]:
  """(config, model) of `load`."""
  config, model, _ = load(workdir, step, ema=ema, mesh=mesh)
  return config, model


def load(workdir, step: int | None = None, *, ema: bool = True,
         mesh: Mesh | None = None) -> tuple[Any, nnx.Module, int]:
  """Loads WORKDIR/config.json and a checkpoint's params (EMA if saved and `ema`) into a model;
  returns (config, model, the checkpoint's step).

  Without `step`, a newest checkpoint that fails to restore is reported on stderr and the
  next older one is used (tfx.checkpoint.Checkpointer.restore_newest); this reader moves
  nothing, as a trainer may be writing the workdir.

  With a mesh each param is restored straight into its training layout (tfx.mesh.LOGICAL_RULES:
  FSDP over `embed`, tensor over heads/mlp/vocab), so no device ever holds the whole model;
  without one, everything lands on the first local device.
  """
  config = workdir_lib.load_config(workdir)
  ckpt = ckpt_lib.Checkpointer.open_existing(workdir)
  try:
    have = ckpt.all_steps()
    if not have or (step is not None and step not in have):
      raise ckpt_lib.NoCheckpointError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                                       f"{ckpt.directory} (available: {have or 'none'})")

    graphdefs = []

    def split():
      with nnx.use_eager_sharding(False):
        model = model_lib.build_model(config, nnx.Rngs(config.seed))
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      graphdefs.append(graphdef)
      return params, rest

    abstract_state, _ = jax.eval_shape(split)
    abstract_params = nnx.to_pure_dict(abstract_state)
    if mesh is None:
      whole = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: whole, abstract_params)
    else:
      whole = NamedSharding(mesh, PartitionSpec())  # replicated
      shardings = nnx.to_pure_dict(mesh_lib.state_shardings(abstract_state, mesh))
      _check_divides(abstract_params, shardings)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params, shardings)

    def restore_one(s: int):
      key = "ema" if ema and "ema" in ckpt.saved_keys(s) else "params"
      return ckpt.restore_subtree(s, {key: target})[key]

    if step is None:
      step, params = ckpt.restore_newest(restore_one, move_aside=False,
                                         report=lambda m: print(m, file=sys.stderr))
    else:
      try:
        params = restore_one(step)
      except Exception as e:  # noqa: BLE001 - a damaged checkpoint asked for by step: one line
        raise ckpt_lib.DamagedCheckpointError(f"checkpoint at step {step} in {ckpt.directory} does not "
                                              f"restore ({ckpt_lib.reason(e)})") from None
  finally:
    ckpt.close()
  # non-Param variables are rebuilt, not stored
  rest = jax.jit(lambda: nnx.to_pure_dict(split()[1]), out_shardings=whole)()
  return config, nnx.merge(graphdefs[-1], params, rest), step
