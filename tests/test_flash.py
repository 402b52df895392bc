"""The Pallas flash-attention kernel (interpret mode) against the dense Transfusion mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tfx.config
import tfx.model
from tfx import losses
from tfx.model import attention, flash, presets

from core_batches import fast_rngs, random_batch, reference_mask

# Small tiles so that short test sequences still span several blocks on both sides.
BLOCKS = flash.BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=32)


def _packing(seed, B=3, L=90, n=8):
  """Rows with 1-3 segments, 0-3 images of n patches and padding; L is not a multiple of 16."""
  batch = random_batch(np.random.default_rng(seed), B, L, n, 4, vocab=50, max_images=3, min_segments=1)
  segment = jnp.asarray(batch["segment_ids"])
  horizon = attention.horizon(jnp.asarray(batch["image_ids"]), jnp.asarray(batch["modality"]))
  return batch, segment, horizon


def _qkv(seed, B, L, H, G, K, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v, ct = (jax.random.normal(kk, (B, L, h, K), jnp.float32)
                 for kk, h in zip(ks, (H, G, G, H)))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), ct


@jax.jit
def _dense_and_grads(q, k, v, ct, segment, horizon):
  mask = attention.dense_mask(segment, horizon, segment)
  f = lambda q, k, v: attention._dense_attention(q, k, v, mask)
  out, vjp = jax.vjp(f, q, k, v)
  return out, vjp(ct.astype(out.dtype))


@jax.jit
def _flash_and_grads(q, k, v, ct, segment, horizon):
  f = lambda q, k, v: flash.flash_attention(q, k, v, segment, horizon, block_sizes=BLOCKS, interpret=True)
  out, vjp = jax.vjp(f, q, k, v)
  return out, vjp(ct.astype(out.dtype))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_dense_outputs_and_gradients(seed):
  batch, segment, horizon = _packing(seed)
  assert (batch["segment_ids"] == 0).any() and batch["image_ids"].max() >= 1
  q, k, v, ct = _qkv(seed, 3, 90, 4, 2, 16)  # grouped KV heads: 2 query heads per KV head
  out_d, grads_d = _dense_and_grads(q, k, v, ct, segment, horizon)
  out_f, grads_f = _flash_and_grads(q, k, v, ct, segment, horizon)
  np.testing.assert_allclose(out_f, out_d, atol=2e-5)
  for name, gf, gd in zip("qkv", grads_f, grads_d):
    np.testing.assert_allclose(gf, gd, atol=5e-5, err_msg=f"d{name}")


def test_kernel_in_bf16_is_within_bf16_rounding():
  _, segment, horizon = _packing(2)
  q, k, v, ct = _qkv(2, 3, 90, 4, 4, 16, jnp.bfloat16)
  out_d, grads_d = _dense_and_grads(*(x.astype(jnp.float32) for x in (q, k, v)), ct, segment, horizon)
  out_f, grads_f = _flash_and_grads(q, k, v, ct, segment, horizon)
  assert out_f.dtype == jnp.bfloat16
  assert _rel(out_f, out_d) < 1e-2
  for gf, gd in zip(grads_f, grads_d):
    assert gf.dtype == jnp.bfloat16 and _rel(gf, gd) < 2e-2


def test_head_dim_that_is_not_a_power_of_two():
  _, segment, horizon = _packing(3, B=2, L=40)
  q, k, v, ct = _qkv(3, 2, 40, 2, 2, 12)
  out_f = jax.jit(lambda *a: flash.flash_attention(*a, block_sizes=BLOCKS, interpret=True))(
      q, k, v, segment, horizon)
  np.testing.assert_allclose(out_f, _dense_and_grads(q, k, v, ct, segment, horizon)[0], atol=2e-5)


def test_rows_that_see_nothing_give_zeros_and_no_gradient():
  segment = jnp.asarray([[1] * 10 + [0] * 22])  # a short segment, then padding
  horizon = jnp.arange(32)[None]
  q, k, v, ct = _qkv(4, 1, 32, 2, 2, 16)
  out, (dq, dk, dv) = _flash_and_grads(q, k, v, ct, segment, horizon)
  assert np.all(np.asarray(out)[0, 10:] == 0) and np.all(np.isfinite(out))
  assert np.all(np.asarray(dq)[0, 10:] == 0) and np.all(np.asarray(dk)[0, 10:] == 0)
  assert np.all(np.asarray(dv)[0, 10:] == 0)


def test_block_bounds_hold_every_visible_pair_and_skip_hidden_tiles():
  """Each visible (query, key) lies inside the ranges the kernels walk; causal text walks only
  the key blocks at or below the diagonal, and a new segment starts a new range."""
  batch, segment, horizon = _packing(5, B=4, L=96)
  hor, first, last, q_first = (np.asarray(x) for x in flash._bounds(segment, horizon))
  for b in range(4):
    mask = reference_mask(batch["segment_ids"][b], batch["image_ids"][b])
    qi, kj = np.nonzero(mask)
    assert np.all(first[b, qi] <= kj) and np.all(kj <= hor[b, qi])
    assert np.all(q_first[b, kj] <= qi) and np.all(qi <= last[b, kj])
  seg = jnp.asarray([[1] * 64 + [2] * 64])  # two text segments of 4 blocks each
  _, first, last, q_first = (np.asarray(x) for x in flash._bounds(seg, jnp.arange(128)[None]))
  for qb in range(8):
    lo, hi = flash._span(first[0, qb * 16:(qb + 1) * 16].min(), qb * 16 + 15, 16)
    assert (int(lo), int(hi)) == ((0, qb + 1) if qb < 4 else (4, qb + 1))
  for kb in range(8):  # key block kb is seen by query blocks kb .. end of its segment
    lo, hi = flash._span(q_first[0, kb * 16:(kb + 1) * 16].min(), last[0, kb * 16:(kb + 1) * 16].max(), 16)
    assert (int(lo), int(hi)) == ((kb, 4) if kb < 4 else (kb, 8))


def test_implementation_choice():
  assert attention.implementation("auto") == "dense"  # CPU
  assert attention.implementation("flash") == "flash_interpret"
  with pytest.raises(ValueError, match="model.attention"):
    attention.implementation("fast")


def _config(**model):
  c = presets.apply(tfx.config.default(), "tiny")
  c.seq_len = 48
  c.image.resolution, c.image.patch_size, c.autoencoder.latent_channels = 8, 2, 3  # n=16, P=12
  c.model.update(model)
  return c


def test_model_with_flash_attention_gives_the_dense_loss_and_gradients():
  """Same params, remat keeping the attention outputs: the whole loss and its gradients match
  the dense model's."""
  graphdef_d, params = nnx.split(tfx.model.build_model(_config(attention="dense"), fast_rngs(0)))
  flash_abstract = nnx.eval_shape(lambda: tfx.model.build_model(
      _config(attention="flash", remat="attention"), nnx.Rngs(0)))
  graphdef_f = nnx.graphdef(flash_abstract)
  batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(6), 2, 48, 16, 12, vocab=200,
                                                     max_images=2, min_segments=2).items()}
  config = _config()

  def loss_and_grad(graphdef):
    f = lambda p: losses.transfusion_loss(nnx.merge(graphdef, p), batch, jax.random.key(1), config)[0]
    return jax.jit(jax.value_and_grad(f))(params)

  loss_d, grads_d = loss_and_grad(graphdef_d)
  loss_f, grads_f = loss_and_grad(graphdef_f)
  np.testing.assert_allclose(loss_f, loss_d, rtol=1e-5)
  for (path, gd), gf in zip(jax.tree_util.tree_leaves_with_path(grads_d), jax.tree.leaves(grads_f)):
    np.testing.assert_allclose(gf, gd, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_kernel_with_causal_images_matches_dense_and_walks_only_the_causal_tiles():
  """model.image_attention="causal" is horizon[i] = i: the kernel matches the dense path on it,
  and its block bounds are those of plain causal attention (no tile above the diagonal)."""
  batch, segment, _ = _packing(2)
  horizon = attention.horizon(jnp.asarray(batch["image_ids"]), jnp.asarray(batch["modality"]), "causal")
  q, k, v, ct = _qkv(2, 3, 90, 2, 2, 16)
  out_d, grads_d = _dense_and_grads(q, k, v, ct, segment, horizon)
  out_f, grads_f = _flash_and_grads(q, k, v, ct, segment, horizon)
  assert _rel(out_f, out_d) < 1e-5
  for gf, gd in zip(grads_f, grads_d):
    assert _rel(gf, gd) < 1e-5
  hor = np.asarray(flash._bounds(segment, horizon)[0])
  real = batch["segment_ids"] != 0
  np.testing.assert_array_equal(hor[real], np.nonzero(real)[1])  # every horizon is the query's own index
