"""Multi-slice meshes (ICI x DCN) and multi-process training through `python -m tfx.train`."""
import dataclasses
import os
import pathlib
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from tfx import mesh, metrics, record
from tfx.data import pipeline
from data_testing import small_config

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def test_single_slice_mesh_is_unchanged_and_one_process_simulates_slices():
  single = mesh.make_mesh(_mesh_config(fsdp=2))
  assert dict(single.shape) == {"data": len(jax.devices()) // 2, "fsdp": 2, "tensor": 1}
  # one process (a dry run): contiguous device groups stand in for the slices
  devices = jax.devices()[:8]
  hybrid = mesh.make_mesh(_mesh_config(fsdp=2, dcn_data=2), devices)
  assert dict(hybrid.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert {d.id for d in hybrid.devices[:2].ravel()} == {d.id for d in devices[:4]}
  with pytest.raises(mesh.MeshError, match="4 devices are not divisible"):
    mesh.make_mesh(_mesh_config(fsdp=8, dcn_data=2), devices)  # 4 devices per slice, not 8


def test_global_batch_with_fixed_streams_does_not_depend_on_the_number_of_hosts():
  config = small_config()
  config.global_batch_size = 8
  config.data.streams = 4   # fixed: the global batch no longer depends on the host count
  one = pipeline.make_iterator(config, process_index=0, process_count=1)
  hosts = [pipeline.make_iterator(config, process_index=i, process_count=2) for i in range(2)]
  for _ in range(3):
    whole, halves = next(one), [next(h) for h in hosts]
    for k in record.FIELDS:
      np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]), err_msg=k)


# -- 2 processes x 4 devices against 1 process x 8 devices, through `python -m tfx.train` -----------


def _train_flags():
  data = small_config().data  # a small prepared shapes + text dir, shared with the data tests
  return ["--config=experiments/shapes.py:tiny", "--config.total_steps=4", "--config.checkpoint_every_steps=2",
          "--config.log_every_steps=1", "--config.mesh.fsdp=2", "--config.data.streams=2", f"--config.data.data_dir={data.data_dir}",
          f"--config.data.shapes_train_size={data.shapes_train_size}",
          f"--config.data.shapes_eval_size={data.shapes_eval_size}"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, devices: int, extra=(), process_id=None, num_processes=None, port=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  args = [sys.executable, "-m", "tfx.train", f"--workdir={workdir}", *_train_flags(), *extra]
  if num_processes:
    args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
             f"--process_id={process_id}"]
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs) -> None:
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]


def _run_two_processes(workdir, extra=()):
  port = _free_port()
  _wait([_launch(workdir, 4, extra, i, 2, port) for i in range(2)])


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


# evaluation and sample grids at the last step; each process generates from its own gathered copy
_EVAL = ["--config.eval_every_steps=4", "--config.sample_every_steps=4", "--config.diffusion.sample_steps=2"]


def test_two_processes_checkpoint_resume_and_match_one_process(tmp_path):
  single, multi = tmp_path / "one_by_8", tmp_path / "two_by_4"
  reference = _launch(single, 8, _EVAL)
  # processes are the DCN granules on CPU: the data axis spans the two processes
  dcn = ["--config.mesh.dcn_data=2"]
  _run_two_processes(multi, ["--config.stop_after_step=2", *dcn])
  assert sorted(_losses(multi)) == [1, 2]
  assert (multi / "checkpoints").is_dir()
  _run_two_processes(multi, [*dcn, *_EVAL])  # resumes from step 2
  _wait([reference])
  want, got = _losses(single), _losses(multi)
  assert sorted(want) == sorted(got) == [1, 2, 3, 4]
  for step in want:
    assert abs(want[step] - got[step]) < 1e-4, (step, want, got)
  # the same evaluation as one process with the model sharded over its 8 devices
  eval_want, eval_got = ([r for r in metrics.read_metrics(w) if "eval_ppl_text" in r] for w in (single, multi))
  assert [r["step"] for r in eval_want] == [r["step"] for r in eval_got] == [4]
  for key, value in eval_want[0].items():
    assert abs(eval_got[0][key] - value) < 1e-3 * max(1.0, abs(value)), (key, eval_want, eval_got)
  # the tiny config draws a grid at the end of every run: the 2-process one stopped at step 2 too
  assert sorted(p.name for p in (single / "samples").iterdir()) == ["text_to_image_00000004.png"]
  assert sorted(p.name for p in (multi / "samples").iterdir()) == [f"text_to_image_0000000{s}.png" for s in (2, 4)]
  grid_want, grid_got = (np.asarray(Image.open(w / "samples" / "text_to_image_00000004.png"), np.int32)
                         for w in (single, multi))
  assert grid_want.shape == grid_got.shape and np.mean(np.abs(grid_want - grid_got) > 8) < 0.01
