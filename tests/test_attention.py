"""The Transfusion attention mask and the KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tfx.config
import tfx.model
from tfx import patching, record
from tfx.model import attention, presets

from core_batches import fast_rngs, random_batch, reference_mask

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
  presets.apply(c, "tiny")
  c.image.resolution, c.image.patch_size, c.autoencoder.latent_channels = 8, 4, 3  # n=4, P=48
  c.model.update(model)
  return c


@pytest.fixture(scope="module")
def cached_pair():
  """A tiny model (scanned layers, QK-norm, tied head: the variants test_model leaves out), jitted calls."""
  config = _config(scan_layers=True, qk_norm=True, tie_embeddings=True)  # paths the other tests skip
  model = tfx.model.build_model(config, fast_rngs(1))
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


CUT, TOTAL = 24, 48


@pytest.fixture(scope="module")
def split_batch():
  """Two rows of 48 positions whose cut at 24 splits no image, with an image after the cut."""
  p_dim = patching.patch_dim(4, 3)
  rng = np.random.default_rng(3)
  while True:
    b = random_batch(rng, 2, TOTAL, 4, p_dim, vocab=200, max_images=2, min_segments=2)
    mod = b["modality"]
    if not (mod[:, CUT - 1] & mod[:, CUT]).any() and mod[:, CUT:].any() and mod[:, :CUT].any():
      break
  t = np.random.default_rng(4).uniform(0, 999, (2, TOTAL)).astype(np.float32)
  return {k: jnp.asarray(v) for k, v in b.items()}, jnp.asarray(t)


def test_kv_cache_prefix_then_rest_equals_full_forward(cached_pair, split_batch):
  config, model, params, full, step = cached_pair
  batch, t = split_batch
  logits, patch_out = full(params, batch, t)
  cache = model.init_cache(2, 64)
  lo1, po1, cache = step(params, _slice(batch, 0, CUT), t[:, :CUT], cache)
  assert int(cache.length) == CUT
  lo2, po2, cache2 = step(params, _slice(batch, CUT, TOTAL), t[:, CUT:], cache)
  assert int(cache2.length) == TOTAL
  np.testing.assert_allclose(np.concatenate([lo1, lo2], 1), logits, atol=1e-5)
  np.testing.assert_allclose(np.concatenate([po1, po2], 1), patch_out, atol=1e-5)
  with pytest.raises(ValueError, match="overflow"):
    step(params, batch, t, model.init_cache(2, TOTAL - 1))


def test_denoising_steps_reuse_an_uncommitted_prefix(cached_pair, split_batch):
  """Re-running the images after the prefix against the same cache ignores earlier uncommitted calls."""
  config, model, params, full, step = cached_pair
  batch, t = split_batch
  _, _, cache = step(params, _slice(batch, 0, CUT), t[:, :CUT], model.init_cache(2, 64))
  rest = _slice(batch, CUT, TOTAL)
  _, out_a, _ = step(params, rest, t[:, CUT:], cache)
  _, out_other, discarded = step(params, dict(rest, patches=rest["patches"] * 0.5), t[:, CUT:] * 0.5, cache)
  _, out_b, _ = step(params, rest, t[:, CUT:], cache)
  assert int(discarded.length) == TOTAL and int(cache.length) == CUT
  np.testing.assert_array_equal(out_a, out_b)
  assert np.abs(np.asarray(out_other) - np.asarray(out_a)).max() > 1e-4


def test_causal_images_hide_exactly_each_patch_from_the_later_patches_of_its_image():
  rng = np.random.default_rng(7)
  batch = random_batch(rng, 8, L, N, P, vocab=50, max_images=3, min_segments=2)
  seg, ids = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["image_ids"])
  mod = jnp.asarray(batch["modality"])
  both = {kind: np.asarray(attention.dense_mask(seg, attention.horizon(ids, mod, kind), seg))
          for kind in attention.IMAGE_ATTENTION}
  hidden = 0
  for b in range(8):
    s, im = batch["segment_ids"][b], batch["image_ids"][b]
    i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    later_patch_of_own_image = (im[i] > 0) & (im[i] == im[j]) & (s[i] == s[j]) & (s[i] != 0) & (j > i)
    hidden += later_patch_of_own_image.sum()
    np.testing.assert_array_equal(both["bidirectional"][b] & ~both["causal"][b], later_patch_of_own_image)
    assert not (both["causal"][b] & ~both["bidirectional"][b]).any()
    np.testing.assert_array_equal(both["causal"][b], reference_mask(s, np.zeros_like(im)))  # plain causal
  assert hidden > 0
  with pytest.raises(ValueError, match="image_attention"):
    attention.horizon(ids, mod, "full")


def test_causal_images_in_the_model_and_its_kv_cache(split_batch):
  """A causal-image model: a patch's output ignores later patches of its image (the bidirectional
  one does not), and prefix-then-rest through the KV cache equals the full forward."""
  batch, t = split_batch
  outs = {}
  for kind in attention.IMAGE_ATTENTION:
    model = tfx.model.build_model(_config(image_attention=kind), fast_rngs(1))
    graphdef, params = nnx.split(model)
    full = jax.jit(lambda p, b, t: nnx.merge(graphdef, p)(b, t)[:2])
    mod = np.asarray(batch["modality"])
    row, pos = np.argwhere(mod == record.IMAGE)[0]  # the first patch of the first image ...
    later = batch["patches"].at[row, pos + 1].add(1.0)  # ... and a change to the next patch
    a, b = full(params, batch, t)[1], full(params, dict(batch, patches=later), t)[1]
    outs[kind] = float(jnp.abs(a[row, pos] - b[row, pos]).max())
    if kind == "causal":
      step = jax.jit(lambda p, b, t, c: nnx.merge(graphdef, p)(b, t, cache=c))
      logits, patch_out = full(params, batch, t)
      lo1, po1, cache = step(params, _slice(batch, 0, CUT), t[:, :CUT], model.init_cache(2, 64))
      lo2, po2, _ = step(params, _slice(batch, CUT, TOTAL), t[:, CUT:], cache)
      np.testing.assert_allclose(np.concatenate([lo1, lo2], 1), logits, atol=1e-5)
      np.testing.assert_allclose(np.concatenate([po1, po2], 1), patch_out, atol=1e-5)
  assert outs["causal"] == 0.0 and outs["bidirectional"] > 1e-4
  with pytest.raises(ValueError, match="image_attention"):
    tfx.model.build_model(_config(image_attention="full"), fast_rngs(1))
