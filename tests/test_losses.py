"""transfusion_loss against a numpy float64 reference; masking, timesteps, empty modalities."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfx.config
from tfx import losses

from core_batches import random_batch

N, P, L, V = 4, 6, 64, 40


class FakeModel:
  """A fixed smooth function of the inputs, mirrored in numpy below."""

  def __init__(self, xp, emb, proj, junk=0.0):
    self.xp, self.emb, self.proj, self.junk = xp, emb, proj, junk

  def __call__(self, batch, t_BL):
    xp = self.xp
    image = (batch["modality"] == 1)[..., None]
    logits = self.emb[batch["tokens"]] + 0.3 * xp.tanh(batch["patches"] @ self.proj) + 1e-3 * t_BL[..., None]
    out = 0.5 * batch["patches"] + xp.sin(t_BL / 300.0)[..., None]
    # junk where the loss must not look: logits off lm_mask, outputs off images
    logits = logits + self.junk * (1 - batch["lm_mask"])[..., None]
    out = out + self.junk * (1 - image)
    return logits, out, None


def _config(prediction="eps", weighting="none"):
  c = tfx.config.default()
  c.diffusion.prediction, c.diffusion.loss_weighting = prediction, weighting
  return c


def _reference(batch, t, eps, emb, proj, d):
  """Float64 numpy Transfusion loss."""
  T, s = d.num_timesteps, 0.008
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
  ab = np.cumprod(1 - np.asarray(betas))[t][..., None]
  x0 = batch["patches"].astype(np.float64)
  image = batch["modality"] == 1
  x_t = np.where(image[..., None], np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, 0.0)
  logits, out, _ = FakeModel(np, emb, proj)(dict(batch, patches=x_t), t.astype(np.float64))
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = logz - np.take_along_axis(logits, batch["lm_targets"][..., None], -1)[..., 0]
  mask = batch["lm_mask"]
  lm = (ce * mask).sum() / max(mask.sum(), 1)
  target = dict(eps=eps, x0=x0, v=np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0)[d.prediction]
  err = ((out - target) ** 2).mean(-1)
  if d.loss_weighting in ("min_snr", "clipped_v"):
    snr = (ab / (1 - ab))[..., 0]
    x0_weight = np.minimum(snr, d.min_snr_gamma) + (d.loss_weighting == "clipped_v")
    err = err * x0_weight / dict(eps=snr, v=snr + 1, x0=1.0)[d.prediction]
  per_image = []
  for b in range(batch["tokens"].shape[0]):
    for i in set(batch["image_ids"][b][image[b]].tolist()):
      per_image.append(err[b][image[b] & (batch["image_ids"][b] == i)].mean())
  diff = np.mean(per_image) if per_image else 0.0
  return lm + d.loss_weight * diff, lm, diff, mask.sum(), len(per_image)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  batch = random_batch(rng, 4, L, N, P, vocab=V, max_images=3, min_segments=2)
  emb = rng.normal(size=(V, V))
  proj = rng.normal(size=(P, V)) * 0.3
  return batch, emb, proj


_JITTED = {}


def _jax_loss(batch, emb, proj, config, junk=0.0):
  """The loss of FakeModel, one compile per (prediction, weighting) for the module's batch shape."""
  key = (config.diffusion.prediction, config.diffusion.loss_weighting)
  if key not in _JITTED:
    def loss_fn(b, e, p, j, r):
      loss, metrics = losses.transfusion_loss(FakeModel(jnp, e, p, j), b, r, config)
      return loss, metrics, losses.draw_timesteps_and_noise(r, b, config.diffusion)
    _JITTED[key] = jax.jit(loss_fn)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  return _JITTED[key](jbatch, jnp.asarray(emb, jnp.float32), jnp.asarray(proj, jnp.float32),
                      jnp.float32(junk), jax.random.PRNGKey(7))


@pytest.mark.parametrize("prediction,weighting", [("eps", "none"), ("v", "min_snr"), ("x0", "none"),
                                                  ("x0", "min_snr"), ("x0", "clipped_v"), ("v", "clipped_v")])
def test_loss_matches_float64_reference(setup, prediction, weighting):
  batch, emb, proj = setup
  config = _config(prediction, weighting)
  loss, metrics, (t, eps) = _jax_loss(batch, emb, proj, config)
  ref = _reference(batch, np.asarray(t), np.asarray(eps, np.float64), emb, proj, config.diffusion)
  assert ref[4] >= 4 and ref[3] > 20
  for got, want in zip([loss, metrics["lm_loss"], metrics["diff_loss"], metrics["text_tokens"],
                        metrics["images"]], ref):
    np.testing.assert_allclose(float(got), want, atol=1e-5, rtol=1e-6)
  assert float(metrics["loss"]) == float(loss)


def test_padding_and_other_modality_contribute_nothing(setup):
  batch, emb, proj = setup
  config = _config()
  clean, _, _ = _jax_loss(batch, emb, proj, config)
  dirty, _, _ = _jax_loss(batch, emb, proj, config, junk=7.0)
  assert (batch["segment_ids"] == 0).any()
  np.testing.assert_allclose(float(dirty), float(clean), rtol=1e-6)


def test_one_timestep_per_image_and_noise_limit(setup):
  batch = random_batch(np.random.default_rng(1), 8, 128, N, P, vocab=V, max_images=3, min_segments=3)
  d = _config().diffusion
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  draw = jax.jit(jax.vmap(lambda r: losses.draw_timesteps_and_noise(r, jb, d)[0]))
  ts = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 20)))
  image = batch["modality"] == 1
  assert (ts[:, ~image] == 0).all()
  for b in range(8):
    for i in set(batch["image_ids"][b][image[b]].tolist()):
      sel = image[b] & (batch["image_ids"][b] == i)
      assert (ts[:, b, sel] == ts[:, b, sel][:, :1]).all()  # one t per image
  limited = image & (batch["noise_limited"] == 1)
  free = image & (batch["noise_limited"] == 0)
  assert limited.any() and free.any()
  assert ts[:, limited].max() <= 500 and ts[:, free].max() > 700
  assert len(np.unique(ts[:, limited])) > 10  # uniform below the cap, not piled on it


def test_no_images_or_no_text_gives_finite_zero_terms(setup):
  _, emb, proj = setup
  config = _config()
  text_only = random_batch(np.random.default_rng(2), 4, L, N, P, vocab=V, max_images=0)
  loss, m, _ = _jax_loss(text_only, emb, proj, config)
  assert float(m["images"]) == 0 and float(m["diff_loss"]) == 0 and np.isfinite(float(loss))
  image_only = random_batch(np.random.default_rng(3), 4, L, N, P, vocab=V, max_images=2)
  image_only["lm_mask"][:] = 0
  loss, m, _ = _jax_loss(image_only, emb, proj, config)
  assert float(m["text_tokens"]) == 0 and float(m["lm_loss"]) == 0 and float(m["images"]) > 0
  assert np.isfinite(float(loss))
  with pytest.raises(ValueError, match="loss_weighting"):
    _jax_loss(image_only, emb, proj, _config(weighting="snr?"))
