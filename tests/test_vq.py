"""The VQ tokenizer: trains by tfx.train_autoencoder (loss down, dead codes restarted, usage in
autoencoder.json), loads with autoencoder.kind="vq", and its codes round-trip through the decoder."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfx import autoencoder, metrics, train_autoencoder
from tfx.autoencoder import vq

STEPS = 150


def vq_config(steps: int):
  """A tiny VQ (f = 2, 16 codes of 4 dims) on the small shapes data: the tests' tokenizer."""
  from data_testing import small_config

  c = small_config()
  c.autoencoder.update(kind="vq", latent_channels=4, downsample=2, vae_channels=(8, 8), vae_norm_groups=4,
                       vae_mid_attention=False, codebook_size=16, train_steps=steps, train_batch_size=8,
                       eval_images=16, train_lr=3e-3)
  c.log_every_steps = 1
  c.checkpoint_every_steps = 0
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vq")
  results = train_autoencoder.run(vq_config(STEPS), str(workdir), log=lambda *_: None)
  return workdir, results


def test_loss_goes_down_and_usage_is_reported(trained):
  workdir, results = trained
  records = metrics.read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  first, last = np.mean([r["loss"] for r in records[:3]]), np.mean([r["loss"] for r in records[-3:]])
  assert last < 0.8 * first, (first, last)
  meta = json.loads((workdir / "autoencoder.json").read_text())
  assert meta["kind"] == "vq" and meta["vq"]["codebook_size"] == 16
  assert 1.0 <= meta["test"]["perplexity"] <= 16 and 0 < meta["test"]["codes_used"] <= 1
  assert meta["test"]["perplexity"] == pytest.approx(results["perplexity"])
  assert np.isfinite(results["psnr_db"])
  assert autoencoder.describe(str(workdir))["kind"] == "vq"


def test_codes_round_trip_through_the_decoder(trained):
  workdir, _ = trained
  config = vq_config(STEPS)
  config.autoencoder.path = str(workdir)
  ae = autoencoder.load(config)
  from tfx.autoencoder import quality
  uint8, _ = train_autoencoder.read_images(train_autoencoder.open_images(config, "test"), range(4), 16)
  images = quality.to_unit(uint8)
  codes = np.asarray(ae.encode(images))
  assert codes.shape == (4, 8, 8) and codes.dtype == np.int32 and codes.min() >= 0 and codes.max() < 16
  decoded = ae.decode(codes)
  assert decoded.shape == (4, 16, 16, 3)
  again = np.asarray(ae.encode(decoded))
  # measured: 82% of the codes come back after 150 steps (36% after 12): the decoder's images
  # land in their codes' cells; a broken decode (wrong codebook rows, transposed grid) gives ~1/16
  assert (again == codes).mean() > 0.75, (again == codes).mean()
  with pytest.raises(autoencoder.AutoencoderError, match="int codes"):
    ae.decode(np.zeros((4, 8, 8, 4), np.float32))


def test_dead_codes_restart_at_encoder_outputs():
  """A code nobody picks falls under the usage threshold and moves onto an encoder output of the batch."""
  config = vq_config(1)
  config.autoencoder.vq_dead_threshold = 0.5
  net = vq.build(config, nnx.Rngs(0))
  far = 1e3 * jnp.ones_like(net.codebook[...][:1])
  net.codebook[...] = net.codebook[...].at[3].set(far[0])      # never nearest to anything
  net.usage[...] = net.usage[...].at[3].set(0.5)               # one unused step below the threshold
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  _, (m, updates) = vq.loss_fn(net, images, jax.random.key(0), net.vq)
  z_ND = np.asarray(net.vectors(images)).reshape(-1, 4)
  new = np.asarray(updates["codebook"][3])
  assert m["restarted"] >= 1 and float(updates["usage"][3]) > 0.5
  assert np.min(np.abs(z_ND - new).max(-1)) < 1e-5     # exactly one of the batch's encoder outputs
  assert not np.allclose(np.asarray(updates["codebook"]), np.asarray(net.codebook[...]))
