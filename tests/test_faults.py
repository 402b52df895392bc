"""Faults injected through `python -m tfx.train` on the tiny config: damaged checkpoints, a
second trainer, a changed config, a failed checkpoint write (docs/reliability.md)."""
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from tfx import checkpoint as ckpt_lib
from tfx import lock as lock_lib
from tfx import metrics, restore, workdir as workdir_lib
from train_helpers import compile_cache_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"--config={ROOT / 'experiments' / 'shapes.py'}:tiny"
EVERY_STEP = ["--config.checkpoint_every_steps=1", "--config.keep_checkpoints=0", "--config.log_every_steps=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.getbasetemp() / "jax_cache"
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compile_cache_dir(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def train(workdir, *overrides):
  # no end-of-run sample grid (~1.7 s a run): these runs are about checkpoints and locks
  return [sys.executable, "-m", "tfx.train", TINY, f"--workdir={workdir}", "--config.sample_every_steps=0", *overrides]


def run(env, command, **kwargs):
  return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def tfx_lines(stderr: str) -> list[str]:
  """What tfx itself said on stderr (not progress, not JAX/absl warnings)."""
  return [line for line in stderr.splitlines() if line.startswith("tfx.train")]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """A workdir trained 8 steps with a checkpoint after every step (all kept)."""
  workdir = tmp_path_factory.mktemp("faults") / "reference"
  done = run(env, train(workdir, "--config.total_steps=8", *EVERY_STEP))
  assert done.returncode == 0, done.stderr[-2000:]
  return workdir


def copy_of(reference, path) -> pathlib.Path:
  shutil.copytree(reference, path)
  return path


def biggest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(step_dir):
  path = biggest_state_file(step_dir)
  os.truncate(path, path.stat().st_size // 2)


def flip_4kb(step_dir):
  path = biggest_state_file(step_dir)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
  path.write_bytes(bytes(data))


def state_of_the_step_before(step_dir):
  """A mixed-up copy: every file decodes and every value is finite, only the checksums differ."""
  shutil.rmtree(step_dir / "state")
  shutil.copytree(step_dir.parent / str(int(step_dir.name) - 1) / "state", step_dir / "state")


DAMAGE = {  # step -> (fault, how)
    8: ("truncated data file", truncate),
    7: ("4 KB flipped", flip_4kb),
    6: ("state/ removed", lambda d: shutil.rmtree(d / "state")),
    5: ("_METADATA removed", lambda d: (d / "state" / "_METADATA").unlink()),
    4: ("iterator JSON broken", lambda d: (d / "data" / "process_0-of-1.json").write_text('{"last_seen_ind')),
    3: ("state/ of step 2 copied in", state_of_the_step_before),
}


def test_damaged_checkpoints_are_moved_aside_and_the_run_resumes_from_the_newest_intact(env, reference, tmp_path):
  workdir = copy_of(reference, tmp_path / "damaged")
  for step, (_, damage) in DAMAGE.items():
    damage(workdir / "checkpoints" / str(step))
  done = run(env, train(workdir, "--config.total_steps=8", *EVERY_STEP))
  assert done.returncode == 0, done.stderr[-2000:]
  reports = tfx_lines(done.stderr)
  assert len(reports) == len(DAMAGE), done.stderr[-3000:]
  for step, line in zip(sorted(DAMAGE, reverse=True), reports):
    assert re.match(rf"tfx.train: checkpoint at step {step} is damaged \(.+\); moved to .*checkpoints_damaged/{step}; "
                    r"using step 2$", line), line
  assert "differs from the checksum saved with it" in reports[-1], reports[-1]
  assert "resumed from the checkpoint at step 2" in done.stderr
  assert sorted(p.name for p in (workdir / "checkpoints_damaged").iterdir()) == sorted(map(str, DAMAGE))
  # nothing lost beyond the newest intact checkpoint: steps 3..8 are retrained exactly
  want = {r["step"]: r["loss"] for r in metrics.read_metrics(reference)}
  got = metrics.read_metrics(workdir)
  assert [r["step"] for r in got] == list(range(1, 9))
  assert {r["step"]: r["loss"] for r in got} == want
  _, model_a = restore.restore_model(reference, ema=False)
  _, model_b = restore.restore_model(workdir, ema=False)
  for a, b in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_readers_fall_back_without_moving_and_all_damaged_is_one_error(reference, tmp_path, capsys):
  workdir = copy_of(reference, tmp_path / "readers")
  (workdir / "checkpoints" / "8" / "state" / "_METADATA").unlink()
  _, _, step = restore.load(workdir)  # what tfx.sample / tfx.evaluate call
  assert step == 7
  err = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
  assert len(err) == 1 and err[0].startswith("checkpoint at step 8 is damaged"), err
  assert (workdir / "checkpoints" / "8").exists() and not (workdir / "checkpoints_damaged").exists()
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="does not restore"):
    restore.load(workdir, 8)
  for step_dir in (workdir / "checkpoints").iterdir():
    (step_dir / "state" / "_METADATA").unlink(missing_ok=True)
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=r"no checkpoint in .* restores: step 8: .*; step 7"):
    restore.load(workdir)
  assert len(list((workdir / "checkpoints").iterdir())) == 8  # nothing moved when nothing restores


def _tree_digest(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  for p in sorted(path.rglob("*")):
    h.update(str(p.relative_to(path)).encode())
    if p.is_file():
      h.update(p.read_bytes())
  return h.hexdigest()


def with_file_size_limit(kib: int, command: list[str]) -> list[str]:
  """`command` where a write past `kib` KiB fails with EFBIG (SIGXFSZ ignored), as a full disk fails
  with ENOSPC: a real OS error inside tensorstore's writes, with no test hook in tfx."""
  return ["bash", "-c", f"trap '' XFSZ; ulimit -f {kib}; exec \"$@\"", "bash", *command]


def _copy_cache(source: pathlib.Path, target: pathlib.Path) -> None:
  """The compile cache's entries as they are now. The other pytest worker may be writing one (a
  partial copy is a cache miss with a warning) or have just added one (skipped)."""
  target.mkdir()
  for entry in source.iterdir():
    try:
      shutil.copyfile(entry, target / entry.name)
    except OSError:
      pass


def test_failed_write_then_second_trainer_then_stale_lock_then_resume(env, reference, tmp_path):
  workdir = copy_of(reference, tmp_path / "io")
  before = _tree_digest(workdir / "checkpoints" / "8")
  # 1. A checkpoint write fails (each array file of the tiny model is > 100 KB). The compile
  # cache is a private copy: this run's cache writes are cut short too.
  private = dict(env, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  _copy_cache(pathlib.Path(env["JAX_COMPILATION_CACHE_DIR"]), tmp_path / "cache")
  failed = run(private, with_file_size_limit(98, train(workdir, "--config.total_steps=10", *EVERY_STEP)))
  assert failed.returncode == 74, failed.stderr[-3000:]
  assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
  assert tfx_lines(failed.stderr) == [
      f"tfx.train: saving the checkpoint at step 9 under {workdir / 'checkpoints'} failed: File too large "
      "(the newest complete checkpoint: step 8)"], failed.stderr[-3000:]
  assert _tree_digest(workdir / "checkpoints" / "8") == before
  assert not (workdir / lock_lib.LOCK_FILE).exists()

  # 2. A second trainer on a workdir in use, and a refused config change
  busy = train(workdir, "--config.total_steps=100000", "--config.keep_checkpoints=0", "--config.log_every_steps=1",
               "--config.checkpoint_every_steps=0")
  holder = subprocess.Popen(busy, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  config_path = workdir / workdir_lib.CONFIG_FILE
  deadline = time.time() + 120
  while "100000" not in config_path.read_text() and holder.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert holder.poll() is None
  config_before = config_path.read_text()
  second = subprocess.Popen(busy, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  changed = subprocess.Popen(train(workdir, "--config.global_batch_size=16", "--config.seq_len=64"),
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _, err = second.communicate(timeout=120)
  assert second.returncode == 2
  holder_is = rf"host {re.escape(os.uname().nodename)}, pid {holder.pid}, started \d{{4}}-\d\d-\d\dT[\d:]+\+00:00"
  assert len(tfx_lines(err)) == 1 and re.fullmatch(
      rf"tfx.train: error: workdir {re.escape(str(workdir))} is in use by another trainer \({holder_is}\); "
      r"wait for it to end or use another --workdir", tfx_lines(err)[0]), err[-2000:]
  _, err = changed.communicate(timeout=120)
  assert changed.returncode == 2
  assert len(tfx_lines(err)) == 1 and re.search(
      r"trained with another config \(global_batch_size: 8 -> 16, seq_len: 96 -> 64\).*"
      r"--allow_config_change=global_batch_size,seq_len", err), err[-2000:]
  assert config_path.read_text() == config_before
  holder.send_signal(signal.SIGKILL)
  holder.wait()

  # 3. The dead trainer's lock is taken over; the run completes from the newest complete checkpoint
  done = run(env, train(workdir, "--config.total_steps=10", *EVERY_STEP))
  assert done.returncode == 0, done.stderr[-2000:]
  assert len(tfx_lines(done.stderr)) == 1 and re.fullmatch(
      rf"tfx.train: taking over the stale lock of {re.escape(str(workdir))} \({holder_is}: that process is gone\)",
      tfx_lines(done.stderr)[0]), done.stderr[-2000:]
  assert "resumed from the checkpoint at step 8" in done.stderr
  assert json.loads(done.stdout.splitlines()[-1])["step"] == 10
  assert [r["step"] for r in metrics.read_metrics(workdir)] == list(range(1, 11))
  history = workdir_lib.read_history(workdir)
  assert [h["changed"] for h in history] == [
      {"total_steps": [8, 10]},                                          # the failed run
      {"checkpoint_every_steps": [1, 0], "total_steps": [10, 100000]},  # the killed holder
      {"checkpoint_every_steps": [0, 1], "total_steps": [100000, 10]}]
  assert all(re.match(r"\d{4}-\d\d-\d\dT", h["time"]) for h in history)
  assert not (workdir / lock_lib.LOCK_FILE).exists()
