"""Multi-slice meshes (ICI x DCN) and multi-process training through `python -m tfx.train`."""
import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from tfx import mesh


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  slice_index: int
  process_index: int = 0
  platform: str = "fake"
  device_kind: str = "fake"


def _mesh_config(**kw):
  return ml_collections.ConfigDict(dict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1), **kw))


def test_hybrid_grid_puts_slices_on_the_outer_axis():
  devices = [FakeDevice(id=i, slice_index=i // 8) for i in range(16)]  # 2 slices of 8
  grid = mesh.hybrid_device_grid(_mesh_config(data=1, fsdp=4, tensor=2, dcn_data=2), devices)
  assert grid.shape == (2, 4, 2)
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  np.testing.assert_array_equal(slice_of[0], 0)  # data replica 0 lives wholly on slice 0
  np.testing.assert_array_equal(slice_of[1], 1)
  # fsdp and tensor never cross a slice boundary
  assert sorted(d.id for d in grid[1].ravel()) == list(range(8, 16))


def test_hybrid_grid_fills_minus_one_per_slice_and_checks_sizes():
  devices = [FakeDevice(id=i, slice_index=i // 4) for i in range(16)]  # 4 slices of 4
  grid = mesh.hybrid_device_grid(_mesh_config(data=1, fsdp=-1, tensor=1, dcn_data=2, dcn_fsdp=2), devices)
  assert grid.shape == (2, 8, 1)
  with pytest.raises(mesh.MeshError, match="slices"):
    mesh.hybrid_device_grid(_mesh_config(dcn_data=3), devices)  # 16 devices, 3 slices
  with pytest.raises(mesh.MeshError, match="cannot lay out"):
    mesh.hybrid_device_grid(_mesh_config(dcn_data=8), devices[:8])  # 8 "slices" but the devices say 2
  with pytest.raises(mesh.MeshError, match="positive"):
    mesh.dcn_shape(_mesh_config(dcn_tensor=0))


def test_single_slice_mesh_is_unchanged_and_processes_are_slices_on_cpu():
  single = mesh.make_mesh(_mesh_config(fsdp=2))
  assert dict(single.shape) == {"data": len(jax.devices()) // 2, "fsdp": 2, "tensor": 1}
  # CPU devices carry no slice_index, so processes are the slices: one process cannot be two
  with pytest.raises(mesh.MeshError, match="cannot lay out"):
    mesh.make_mesh(_mesh_config(dcn_data=2))
