"""tfx.train_autoencoder's loop has the trainer's guarantees: SIGTERM saves and stops cleanly,
a resume finishes the run, and a non-finite update is never saved."""
import os
import signal

import numpy as np
import pytest

from tfx import metrics, train_autoencoder


def _vae_config(steps: int, **optim):
  from data_testing import small_config

  c = small_config()
  c.autoencoder.update(kind="vae", latent_channels=4, downsample=1, vae_channels=(8,), vae_norm_groups=4,
                       vae_mid_attention=False, train_steps=steps, train_batch_size=8, eval_images=8)
  c.optim.update(optim)
  c.log_every_steps = 1
  c.checkpoint_every_steps = 0
  return c


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) \
      if (workdir / "checkpoints").exists() else []


def test_sigterm_saves_stops_and_the_resume_finishes(tmp_path):
  def log(line):  # step 1's line is logged (delayed fetch) after step 2 was dispatched
    if line.startswith("step 1/"):
      os.kill(os.getpid(), signal.SIGTERM)

  first = train_autoencoder.run(_vae_config(3), str(tmp_path), log=log)
  assert first == {"preempted": True, "step": 2, "start_step": 0}
  assert _steps(tmp_path) == [2] and not (tmp_path / "autoencoder.json").exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back

  resumed = train_autoencoder.run(_vae_config(3), str(tmp_path), log=lambda *_: None)
  assert resumed["start_step"] == 2 and np.isfinite(resumed["psnr_db"])
  records = metrics.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
  assert "finite" not in records[0]
  assert (tmp_path / "autoencoder.json").exists()


def test_a_non_finite_update_is_never_saved(tmp_path):
  config = _vae_config(3)
  config.autoencoder.train_lr = 1e39  # inf in float32: step 1's loss and gradient are finite, its update is not
  config.checkpoint_every_steps = 1
  with pytest.raises(metrics.NonFiniteLossError, match="update at step 1"):
    train_autoencoder.run(config, str(tmp_path), log=lambda *_: None)
  assert _steps(tmp_path) == []
