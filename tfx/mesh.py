"""The device mesh and the one table mapping logical axis names to mesh axes."""
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
# Params: `embed` and the U-Net's input channels `conv_in` are sharded FSDP-style;
# `mlp`/`heads`/`kv`/`vocab`/`conv_out` over tensor.
# Activations: the batch is split over every data-like axis.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "kv": None,
    "head_dim": None,
    "vocab": "tensor",
    "patch": None,
    "t_embed": None,
    "conv_in": "fsdp",  # U-Net conv/dense input channels: ~0.27B paper params, sharded, not replicated
    "conv_out": "tensor",
    "conv_kernel": None,
    "norm": None,
    "layers": None,
    # activations
    "act_batch": ("data", "fsdp"),
    "act_len": None,
    "act_embed": None,
    "act_mlp": "tensor",
    "act_heads": "tensor",
    "act_kv": None,
    "act_vocab": "tensor",
}


class MeshError(ValueError):
  """A mesh config that does not fit the devices."""


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry to fill `num_devices`; checks the product."""
  dims = [data, fsdp, tensor]
  if dims.count(-1) > 1:
    raise MeshError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  if any(d == 0 or d < -1 for d in dims):
    raise MeshError(f"mesh: axis sizes must be positive or -1, got {dims}")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if num_devices % known:
      raise MeshError(f"mesh: {num_devices} devices are not divisible by the fixed axes (product {known})")
    dims[dims.index(-1)] = num_devices // known
  if math.prod(dims) != num_devices:
    raise MeshError(f"mesh: data*fsdp*tensor = {math.prod(dims)} but there are {num_devices} devices")
  return tuple(dims)


def dcn_shape(mesh_config) -> tuple[int, int, int]:
  """Per-axis parallelism across slices (DCN); (1, 1, 1) for a single slice."""
  dims = tuple(int(mesh_config.get(f"dcn_{a}", 1)) for a in MESH_AXES)
  if any(d < 1 for d in dims):
    raise MeshError(f"mesh: dcn_* sizes must be positive, got {dims}")
  return dims


def hybrid_device_grid(mesh_config, devices: Sequence) -> np.ndarray:
  """Devices as a [data, fsdp, tensor] array whose axes are dcn x ici: slices outermost.

  Slices are the devices' `slice_index` when they span several (multi-slice TPU),
  else their processes (GPU nodes, CPU processes), else (one process: a dry run on
  simulated devices) equal contiguous groups. data/fsdp/tensor in the config are
  the per-slice sizes.
  """
  dcn = dcn_shape(mesh_config)
  slices = math.prod(dcn)
  if len(devices) % slices:
    raise MeshError(f"mesh: {len(devices)} devices do not split into dcn {dcn} = {slices} equal slices")
  per_slice = len(devices) // slices
  ici = mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, per_slice)
  one_slice = len({getattr(d, "slice_index", 0) for d in devices}) == 1
  try:
    if one_slice and len({d.process_index for d in devices}) == 1:
      blocks = np.empty(dcn, dtype=object)
      for i in range(slices):
        group = devices[i * per_slice:(i + 1) * per_slice]
        blocks[np.unravel_index(i, dcn)] = mesh_utils.create_device_mesh(ici, group)
      return np.block(blocks.tolist())
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=one_slice)
  except ValueError as e:
    raise MeshError(f"mesh: cannot lay out ici {ici} x dcn {dcn}: {e}") from None


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh from a config group with -1 = fill."""
  devices = list(devices if devices is not None else jax.devices())
  if math.prod(dcn_shape(mesh_config)) > 1:
    return Mesh(hybrid_device_grid(mesh_config, devices), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  shape = mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(names: Sequence[str | None] | None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec through LOGICAL_RULES."""
  if not names:
    return PartitionSpec()
  axes, used = [], set()
  for name in names:
    if name is None:
      axes.append(None)
      continue
    if name not in LOGICAL_RULES:
      raise KeyError(f"no sharding rule for logical axis {name!r}; add it to tfx.mesh.LOGICAL_RULES")
    target = LOGICAL_RULES[name]
    parts = (target,) if isinstance(target, str) else tuple(target or ())
    parts = tuple(p for p in parts if p not in used)  # a mesh axis may shard one dim only
    used.update(parts)
    axes.append(parts[0] if len(parts) == 1 else (parts or None))
  return PartitionSpec(*axes)


def _current_mesh() -> Mesh | None:
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op without a mesh."""
  mesh = _current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names)))


def _variable_names(v: nnx.Variable):
  return getattr(v, "out_sharding", None)


def state_specs(state) -> object:
  """PartitionSpecs (same tree as `state`) from each Variable's logical names."""
  return jax.tree.map(
      lambda v: logical_to_spec(_variable_names(v)) if isinstance(v, nnx.Variable) else PartitionSpec(),
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state, mesh: Mesh) -> object:
  """NamedShardings for a (possibly abstract) nnx.State on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a [B, ...] batch array: batch over the data-like axes."""
  return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1)))
