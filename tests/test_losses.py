"""transfusion_loss against a numpy float64 reference; masking, timesteps, empty modalities; chunked head."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit, ndtr, ndtri

from flax import nnx

import tfx.config
import tfx.model
from tfx.model import presets
from tfx import diffusion, losses, record

from core_batches import fast_rngs, random_batch

N, P, L, V = 4, 6, 64, 40


class FakeModel:
  """A fixed smooth function of the inputs, mirrored in numpy below."""

  def __init__(self, xp, emb, proj, junk=0.0):
    self.xp, self.emb, self.proj, self.junk = xp, emb, proj, junk

  def features(self, batch, t_BL):
    xp = self.xp
    image = (batch["modality"] == 1)[..., None]
    logits = self.emb[batch["tokens"]] + 0.3 * xp.tanh(batch["patches"] @ self.proj) + 1e-3 * t_BL[..., None]
    out = 0.5 * batch["patches"] + xp.sin(t_BL / 300.0)[..., None]
    # junk where the loss must not look: logits off lm_mask, outputs off images
    logits = logits + self.junk * (1 - batch["lm_mask"])[..., None]
    out = out + self.junk * (1 - image)
    return logits, out, None  # "hidden states" = the logits; the head below is the identity

  def logits(self, h):
    return h

  def __call__(self, batch, t_BL):
    return self.features(batch, t_BL)


def _config(prediction="eps", weighting="none", chunk=24):
  c = tfx.config.default()
  c.diffusion.prediction, c.diffusion.loss_weighting = prediction, weighting
  c.model.loss_chunk = chunk  # L = 64 is not a multiple: the last chunk is part padding
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
  key = (config.diffusion.prediction, config.diffusion.loss_weighting, config.model.loss_chunk)
  if key not in _JITTED:
    def loss_fn(b, e, p, j, r):
      loss, metrics = losses.transfusion_loss(FakeModel(jnp, e, p, j), b, r, config)
      return loss, metrics, losses.draw_timesteps_and_noise(r, b, config.diffusion)
    _JITTED[key] = jax.jit(loss_fn)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  return _JITTED[key](jbatch, jnp.asarray(emb, jnp.float32), jnp.asarray(proj, jnp.float32),
                      jnp.float32(junk), jax.random.PRNGKey(7))


@pytest.mark.parametrize("prediction,weighting,chunk", [
    ("eps", "none", 24), ("eps", "none", 0), ("v", "min_snr", 24), ("x0", "none", 24),
    ("x0", "min_snr", 24), ("x0", "clipped_v", 24), ("v", "clipped_v", 16)])
def test_loss_matches_float64_reference(setup, prediction, weighting, chunk):
  batch, emb, proj = setup
  config = _config(prediction, weighting, chunk)
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


def test_stratified_timesteps_cover_the_strata():
  present = np.zeros((4, 9), bool)
  present[:, 1:7] = True
  present[3, 5:] = False  # 22 images, the last row shorter
  draw = jax.jit(jax.vmap(lambda r: losses._stratified_uniform(r, jnp.asarray(present))))
  u = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 400)))[:, present]  # [draws, 22]
  assert ((u >= 0) & (u < 1)).all()
  np.testing.assert_array_equal(np.sort(np.floor(u * 22), axis=1), np.tile(np.arange(22), (400, 1)))
  np.testing.assert_allclose(u.mean(0), 0.5, atol=0.06)  # each image's own draw is still uniform
  assert len({tuple(np.argsort(row)) for row in u[:20]}) == 20  # strata go to images at random

  batch = random_batch(np.random.default_rng(1), 8, 128, N, P, vocab=V, max_images=3, min_segments=3)
  batch["noise_limited"][:] = 0
  d = _config().diffusion
  d.timestep_sampling = "stratified"
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  ts = np.asarray(jax.jit(lambda r: losses.draw_timesteps_and_noise(r, jb, d)[0])(jax.random.PRNGKey(3)))
  image = batch["modality"] == 1
  assert (ts[~image] == 0).all()
  per_image = []
  for b in range(8):
    for i in sorted(set(batch["image_ids"][b][image[b]].tolist())):
      sel = image[b] & (batch["image_ids"][b] == i)
      assert (ts[b, sel] == ts[b, sel][0]).all()  # one t per image
      per_image.append(int(ts[b, sel][0]))
  n = len(per_image)
  assert n > 8
  for k, t in enumerate(sorted(per_image)):  # the k-th smallest in the k-th of n strata of [0, 1000)
    assert math.floor(1000 * k / n) <= t <= math.ceil(1000 * (k + 1) / n), (k, t, n)
  d.timestep_sampling = "sobol"
  with pytest.raises(ValueError, match="timestep_sampling must be one of"):
    losses.draw_timesteps_and_noise(jax.random.PRNGKey(0), jb, d)


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


# -- the chunked LM head on the real model ---------------------------------------------

def _full_logits_loss(model, batch, rng, config):
  """The loss as it was before chunking: the head on every position, [B, L, V] logits at once."""
  d = config.diffusion
  schedule = diffusion.make_schedule(d)
  t_BL, eps_BLP = losses.draw_timesteps_and_noise(rng, batch, d)
  x0_BLP = batch["patches"].astype(jnp.float32)
  is_image_BL1 = (batch["modality"] == record.IMAGE)[..., None]
  x_t_BLP = jnp.where(is_image_BL1, diffusion.q_sample(schedule, x0_BLP, t_BL, eps_BLP), 0.0)
  logits_BLV, out_BLP, _ = model(dict(batch, patches=x_t_BLP), t_BL.astype(jnp.float32))
  target_BL = jnp.take_along_axis(logits_BLV, batch["lm_targets"][..., None], -1)[..., 0]
  ce_BL = jax.nn.logsumexp(logits_BLV, -1) - target_BL
  lm = jnp.sum(ce_BL * batch["lm_mask"]) / jnp.maximum(batch["lm_mask"].sum(), 1.0)
  target_BLP = diffusion.target(schedule, x0_BLP, t_BL, eps_BLP, d.prediction)
  diff_sum, images = losses.diffusion_sum(out_BLP, target_BLP, losses.snr_weight(schedule, t_BL, d),
                                          batch["image_ids"], batch["modality"])
  return lm + d.loss_weight * diff_sum / jnp.maximum(images, 1.0)


def test_chunked_head_equals_full_logits_loss_and_gradients():
  c = presets.apply(tfx.config.default(), "tiny")
  c.image.resolution, c.image.patch_size, c.autoencoder.latent_channels = 8, 2, 3  # n=16, P=12
  graphdef, params = nnx.split(tfx.model.build_model(c, fast_rngs(0)))
  batch = random_batch(np.random.default_rng(4), 3, 72, 16, 12, vocab=200, max_images=2, min_segments=2)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  rng = jax.random.PRNGKey(5)

  def grad_of(loss_fn):
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p))))(params)

  want, want_g = grad_of(lambda m: _full_logits_loss(m, batch, rng, c))
  for chunk in (32, 7, 0):  # 72 = 2 x 32 + 8 and 10 x 7 + 2: padded last chunks; 0: one chunk
    c.model.loss_chunk = chunk
    got, got_g = grad_of(lambda m: losses.transfusion_loss(m, batch, rng, c)[0])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(a, b, atol=1e-5)
  assert float(jnp.abs(want_g["lm_head"]["kernel"][...]).max()) > 1e-3  # the head's gradient is compared


def test_chunks_past_every_rows_text_are_skipped():
  """The head runs only on chunks holding some row's text; text moved to the front of each row."""
  B, L, D = 2, 40, 3
  h = jnp.asarray(np.random.default_rng(0).normal(size=(B, L, D)), jnp.float32)
  mask = np.zeros((B, L), np.float32)
  mask[0, 30:35] = 1  # 5 text positions at the end of row 0
  mask[1, [2, 9, 17]] = 1
  targets = jnp.zeros((B, L), jnp.int32)

  def head(h_BCD):
    return jnp.concatenate([h_BCD, -h_BCD], -1)

  def ref():
    logits = head(h)
    ce = jax.nn.logsumexp(logits, -1) - logits[..., 0]
    return float((ce * mask).sum())

  nll_at = jax.jit(lambda m: losses.chunked_nll_sum(head, h, targets, m, 8)[0])
  np.testing.assert_allclose(float(nll_at(jnp.asarray(mask))), ref(), rtol=1e-6)
  # Only the first of the 5 chunks holds text (at most 5 text positions per row): count head calls.
  seen = []
  counting = lambda h_BCD: (jax.debug.callback(lambda: seen.append(1)), head(h_BCD))[1]
  counted = jax.jit(lambda m: losses.chunked_nll_sum(counting, h, targets, m, 8)[0])
  jax.block_until_ready(counted(jnp.asarray(mask)))
  assert len(seen) == 1


@pytest.mark.parametrize("sampling", ["uniform", "stratified"])
def test_logit_normal_timesteps_follow_their_density(sampling):
  batch = random_batch(np.random.default_rng(2), 8, 128, N, P, vocab=V, max_images=3, min_segments=3)
  batch["noise_limited"][:] = 0
  d = _config().diffusion
  d.timestep_sampling, d.timestep_density, d.logit_normal = sampling, "logit_normal", (0.5, 0.8)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  image = batch["modality"] == 1
  first = image & np.concatenate([np.ones((8, 1), bool), batch["image_ids"][:, 1:] != batch["image_ids"][:, :-1]], 1)

  def draw():  # one t per image, 300 draws
    fn = jax.jit(jax.vmap(lambda r: losses.draw_timesteps_and_noise(r, jb, d)[0]))
    return np.asarray(fn(jax.random.split(jax.random.PRNGKey(0), 300)))[:, first]

  ts = draw()
  logit = np.log((ts + 0.5) / (1000 - ts - 0.5))  # each t's midpoint, back through the sigmoid
  assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03, (logit.mean(), logit.std())
  d.timestep_density = "uniform"  # the same draws, not mapped: uniform again
  u = draw()
  np.testing.assert_allclose(np.mean(u < 250), 0.25, atol=0.02)
  assert np.mean(ts < 250) < 0.12  # logit-normal(0.5, 0.8) puts ~4% there


def test_logit_normal_mixed_with_a_uniform_share_follows_the_mixture():
  d = _config().diffusion
  d.timestep_density, d.logit_normal = "logit_normal", (-0.5, 1.0)
  u = (np.arange(20000) + 0.5) / 20000   # evenly spread draws: their image is the inverse CDF
  x = np.linspace(0.01, 0.99, 99)
  for share in (0.0, 0.3, 0.5):
    d.timestep_uniform_share = share
    f = np.asarray(diffusion.timestep_fraction(jnp.asarray(u), d))
    assert np.all(np.diff(f) >= 0) and 0 <= f.min() and f.max() < 1
    want = share * x + (1 - share) * ndtr((np.log(x / (1 - x)) + 0.5) / 1.0)
    np.testing.assert_allclose(np.searchsorted(f, x) / len(u), want, atol=1e-3)
  d.timestep_uniform_share = 0.0  # no share: the closed form, not the grid
  np.testing.assert_allclose(diffusion.timestep_fraction(jnp.asarray(u), d), expit(-0.5 + ndtri(u)), rtol=1e-5)
  d.timestep_uniform_share = 1.0  # all uniform: the draws unchanged (to the grid's quarter of a timestep)
  np.testing.assert_allclose(diffusion.timestep_fraction(jnp.asarray(u), d), u, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(timestep_uniform_share=1.5), r"diffusion.timestep_uniform_share must be a number in \[0, 1\], got 1.5"),
    (dict(timestep_uniform_share=float("nan")), r"diffusion.timestep_uniform_share must be a number in \[0, 1\], got nan"),
    (dict(timestep_density="beta"), r"diffusion.timestep_density must be one of \('uniform', 'logit_normal'\), got 'beta'"),
    (dict(logit_normal=(0.0, 0.0)), r"diffusion.logit_normal must be \(mean, std\) with std > 0, got \(0.0, 0.0\)"),
    (dict(logit_normal=(0.0,)), r"diffusion.logit_normal must be \(mean, std\) with std > 0"),
])
def test_timestep_density_is_checked(bad, message):
  d = _config().diffusion
  d.timestep_density = "logit_normal"
  for key, value in bad.items():
    d[key] = value
  with pytest.raises(ValueError, match=message):
    diffusion.check_timestep_density(d)
