"""The Transfusion attention mask and the KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tfx.config
import tfx.model
from tfx import patching
from tfx.model import attention

from core_batches import random_batch, reference_mask

N, P, L = 4, 12, 64


def test_dense_mask_matches_loop_reference():
  rng = np.random.default_rng(0)
  batch = random_batch(rng, 16, L, N, P, vocab=50, max_images=3, min_segments=2)
  assert batch["image_ids"].max() >= 3  # the packings hold several images
  hor = attention.horizon(jnp.asarray(batch["image_ids"]), jnp.asarray(batch["modality"]))
  mask = np.asarray(attention.dense_mask(jnp.asarray(batch["segment_ids"]), hor,
                                         jnp.asarray(batch["segment_ids"])))
  for b in range(16):
    np.testing.assert_array_equal(mask[b], reference_mask(batch["segment_ids"][b], batch["image_ids"][b]))


def test_adjacent_images_get_separate_horizons():
  image_ids = jnp.asarray([[0, 1, 1, 2, 2, 0]])
  modality = (image_ids > 0).astype(jnp.int32)
  np.testing.assert_array_equal(attention.horizon(image_ids, modality)[0], [0, 2, 2, 4, 4, 5])


def _config(**model):
  c = tfx.config.default()
  c.model.preset = "tiny"
  c.image.resolution, c.image.patch_size, c.autoencoder.latent_channels = 8, 4, 3  # n=4, P=48
  c.model.update(model)
  return c


@pytest.fixture(scope="module")
def cached_pair():
  """A tiny model (scanned layers, so both code paths are covered across tests) and jitted calls."""
  config = _config(scan_layers=True)
  model = tfx.model.build_model(config, nnx.Rngs(1))
  graphdef, params = nnx.split(model)

  @jax.jit
  def full(params, batch, t):
    return nnx.merge(graphdef, params)(batch, t)[:2]

  @jax.jit
  def step(params, batch, t, cache):
    return nnx.merge(graphdef, params)(batch, t, cache=cache)

  return config, model, params, full, step


def _slice(batch, lo, hi):
  return {k: v[:, lo:hi] for k, v in batch.items()}


def test_kv_cache_prefix_then_rest_equals_full_forward(cached_pair):
  config, model, params, full, step = cached_pair
  p_dim = patching.patch_dim(4, 3)
  batch = random_batch(np.random.default_rng(3), 2, 48, 4, p_dim, vocab=200, max_images=2, min_segments=2)
  # cut both rows where neither cuts an image
  cut = next(c for c in range(20, 40) if not (batch["modality"][:, c - 1] & batch["modality"][:, c]).any())
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  t = jnp.asarray(np.random.default_rng(4).uniform(0, 999, (2, 48)), jnp.float32)
  logits, patch_out = full(params, batch, t)
  cache = model.init_cache(2, 64)
  lo1, po1, cache = step(params, _slice(batch, 0, cut), t[:, :cut], cache)
  assert int(cache.length) == cut
  lo2, po2, cache2 = step(params, _slice(batch, cut, 48), t[:, cut:], cache)
  assert int(cache2.length) == 48
  np.testing.assert_allclose(np.concatenate([lo1, lo2], 1), logits, atol=1e-5)
  image = np.asarray(batch["modality"]) == 1
  np.testing.assert_allclose(np.concatenate([po1, po2], 1)[image], np.asarray(patch_out)[image], atol=1e-5)


def test_denoising_steps_reuse_an_uncommitted_prefix(cached_pair):
  """An image re-run against a fixed prefix cache does not depend on earlier denoising calls."""
  config, model, params, full, step = cached_pair
  p_dim = patching.patch_dim(4, 3)
  prefix = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(5), 1, 10, 4, p_dim, 200,
                                                        max_images=0).items()}
  prefix["segment_ids"] = jnp.ones((1, 10), jnp.int32)
  prefix["positions"] = jnp.arange(10)[None]
  _, _, cache = step(params, prefix, jnp.zeros((1, 10)), model.init_cache(1, 32))
  image = {k: jnp.zeros((1, 4) + v.shape[2:], v.dtype) for k, v in prefix.items()}
  image.update(modality=jnp.ones((1, 4), jnp.int32), image_ids=jnp.ones((1, 4), jnp.int32),
               segment_ids=jnp.ones((1, 4), jnp.int32), positions=jnp.arange(10, 14)[None])
  x1 = dict(image, patches=jnp.asarray(np.random.default_rng(6).normal(size=(1, 4, p_dim)), jnp.float32))
  x2 = dict(image, patches=x1["patches"] * 0.5)
  t = jnp.full((1, 4), 500.0)
  _, out_a, _ = step(params, x1, t, cache)
  _, _, discarded = step(params, x2, t, cache)
  _, out_b, _ = step(params, x1, t, cache)
  assert int(discarded.length) == 14 and int(cache.length) == 10
  np.testing.assert_array_equal(out_a, out_b)
  # and the cached call equals the full forward of prefix + image
  whole = {k: jnp.concatenate([prefix[k], x1[k]], 1) for k in prefix}
  _, full_out = full(params, whole, jnp.concatenate([jnp.zeros((1, 10)), t], 1))
  np.testing.assert_allclose(out_a, full_out[:, 10:], atol=1e-5)
