"""`python -m tfx.train` end to end: SIGKILL + restart is exact; bad input is one line, exit 2."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from tfx import metrics, restore, trainer, workdir as workdir_lib
from train_helpers import compile_cache_dir, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"--config={ROOT / 'experiments' / 'shapes.py'}:tiny"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: CPU, 8 simulated devices, a shared compile cache."""
  cache = tmp_path_factory.getbasetemp() / "jax_cache"
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compile_cache_dir(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def train_command(workdir, *overrides):
  return [sys.executable, "-m", "tfx.train", TINY, f"--workdir={workdir}", *overrides]


def finished_checkpoints(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_sigkill_then_same_command_resumes_exactly(env, tmp_path):
  run = ["--config.total_steps=40", "--config.checkpoint_every_steps=5", "--config.log_every_steps=1",
         "--config.sample_every_steps=0"]   # no end-of-run grid: resume is what this checks
  killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
  # The reference runs first so the killed run starts from the compile cache and
  # reaches its checkpoint quickly, with most of its steps still to go.
  reference = subprocess.run(train_command(reference_dir, *run), env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
  assert reference.returncode == 0, reference.stderr[-2000:]
  assert json.loads(reference.stdout.splitlines()[-1])["step"] == 40
  victim = subprocess.Popen(train_command(killed_dir, *run), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not finished_checkpoints(killed_dir) and victim.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  k = max(finished_checkpoints(killed_dir))
  assert k < 40

  restarted = subprocess.run(train_command(killed_dir, *run), env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
  assert restarted.returncode == 0, restarted.stderr[-2000:]
  assert f"resumed from the checkpoint at step {k}" in restarted.stderr

  want = {r["step"]: r["loss"] for r in metrics.read_metrics(reference_dir)}
  got = metrics.read_metrics(killed_dir)
  assert [r["step"] for r in got] == list(range(1, 41))  # steps after k logged once, not twice
  assert {r["step"]: r["loss"] for r in got if r["step"] > k} == {s: want[s] for s in range(k + 1, 41)}
  _, model_a = restore.restore_model(reference_dir, ema=False)
  _, model_b = restore.restore_model(killed_dir, ema=False)
  for a, b in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _guarded_workdir(path: pathlib.Path) -> pathlib.Path:
  """A workdir holding an earlier run's config.json (resolved, as the trainer saves it) that no bad command may touch."""
  path.mkdir(parents=True)
  workdir_lib.save_config(path, trainer.resolve(tiny_config()))
  return path


def test_bad_input_is_one_line_exit_2_and_touches_nothing(env, tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  cases = {
      "unknown config key": (["--config.model.no_such_key=1"], r"unknown config key 'no_such_key'"),
      "missing config file": ([f"--config={tmp_path / 'nope.py'}"], r"config file .*nope\.py does not exist"),
      "mesh": (["--config.mesh.data=3"], r"mesh: .*3.* 8 devices"),
      "batch": (["--config.global_batch_size=12"], r"global_batch_size 12 is not divisible by the data-parallel size 8"),
      "model shape": (["--config.model.d_model=64"], r"another model shape \(model\.d_model: 32 -> 64\)"),
      "grad accumulation": (["--config.optim.grad_accum_steps=3"],
                            r"global_batch_size 8 is not divisible by optim.grad_accum_steps 3"),
      "guidance interval": (["--config.diffusion.cfg_interval=(0.8,0.2)"],
                            r"diffusion.cfg_interval must satisfy 0 <= lo <= hi <= 1, got \(0.8, 0.2\)"),
      "x0 clipping": (["--config.diffusion.clip_x0=-2.0"], r"diffusion.clip_x0 must be a number >= 0 \(0 = off\), got -2.0"),
      "best of": (["--config.diffusion.best_of=0"], r"diffusion.best_of must be an integer >= 1 \(1 = no reranking\), got 0"),
      "timestep sampling": (["--config.diffusion.timestep_sampling=sobol"],
                            r"diffusion.timestep_sampling must be one of \('uniform', 'stratified'\), got 'sobol'"),
      "timestep density": (["--config.diffusion.timestep_density=logit_normal", "--config.diffusion.logit_normal=(0.0,-1.0)"],
                           r"diffusion.logit_normal must be \(mean, std\) with std > 0, got \(0.0, -1.0\)"),
      "timestep uniform share": (["--config.diffusion.timestep_density=logit_normal",
                                  "--config.diffusion.timestep_uniform_share=-0.2"],
                                 r"diffusion.timestep_uniform_share must be a number in \[0, 1\], got -0.2"),
      "lr schedule": (["--config.optim.schedule=wsd", "--config.optim.decay_fraction=1.5"],
                      r"optim.decay_fraction must be in \(0, 1\], got 1.5"),
  }
  procs = {}
  for name, (extra, _) in cases.items():
    workdir = _guarded_workdir(tmp_path / name.replace(" ", "_"))
    procs[name] = (workdir, subprocess.Popen(train_command(workdir, *extra), env=env, cwd=ROOT,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  procs["unwritable workdir"] = (None, subprocess.Popen(
      train_command(not_a_dir / "run"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True))
  cases["unwritable workdir"] = (None, r"workdir .*run is not writable")
  original = (tmp_path / "batch" / "config.json").read_text()
  for name, (workdir, proc) in procs.items():
    out, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("W")]
    assert proc.returncode == 2, (name, err[-1500:])
    assert len(lines) == 1 and re.search(cases[name][1], lines[0]), (name, err[-1500:])
    if workdir is not None:
      assert sorted(p.name for p in workdir.iterdir()) == ["config.json"], name
      assert (workdir / "config.json").read_text() == original, name


def test_readme_test_command_is_what_ci_runs():
  readme = (ROOT / "README.md").read_text()
  quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  commands = re.findall(r"```(?:bash|sh)?\n(.*?)```", quickstart, re.S)
  assert len(commands) == 2
  assert "experiments/shapes.py" in commands[0] and "python -m tfx.train" in commands[0]
  ci = (ROOT / ".ci" / "run").read_text()
  for line in commands[1].strip().splitlines():
    assert line.strip() in ci, line
