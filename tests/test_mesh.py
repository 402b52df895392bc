import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tfx import mesh, patching


def test_mesh_fill_and_errors():
  assert mesh.mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
  assert mesh.mesh_shape(1, -1, 1, 8) == (1, 8, 1)
  with pytest.raises(mesh.MeshError, match="not divisible"):
    mesh.mesh_shape(-1, 3, 1, 8)
  with pytest.raises(mesh.MeshError, match="devices"):
    mesh.mesh_shape(2, 2, 1, 8)
  with pytest.raises(mesh.MeshError, match="at most one"):
    mesh.mesh_shape(-1, -1, 1, 8)


def test_rules_map_logical_names():
  assert mesh.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert mesh.logical_to_spec(("act_batch", "act_len", "act_embed")) == P(("data", "fsdp"), None, None)
  with pytest.raises(KeyError, match="no sharding rule"):
    mesh.logical_to_spec(("nonsense",))


def test_make_mesh_uses_all_devices():
  m = mesh.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2)))
  assert dict(m.shape) == {"data": len(jax.devices()) // 4, "fsdp": 2, "tensor": 2}


def test_constrain_is_noop_without_mesh():
  x = np.ones((4, 3), np.float32)
  np.testing.assert_array_equal(mesh.constrain(jax.numpy.asarray(x), ("act_batch", None)), x)


def test_patchify_roundtrip_and_raster_order():
  g = np.random.default_rng(0).normal(size=(2, 8, 8, 3))
  p = patching.patchify(g, 4)
  assert p.shape == (2, 4, 48)
  np.testing.assert_array_equal(p[0, 1], g[0, 0:4, 4:8].reshape(-1))  # top-right patch second
  np.testing.assert_array_equal(patching.unpatchify(p, 4, 3), g)
  with pytest.raises(ValueError, match="divisible"):
    patching.patchify(g, 3)
