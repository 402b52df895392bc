"""The Mosaic (TPU) flash kernels in Pallas TPU interpret mode against the dense path, their
skip ranges, and both lowerings lowered from this CPU for their platforms (TPU, CUDA)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfx.model import attention, flash, flash_tpu

from test_flash import _dense_and_grads, _packing, _qkv, _rel

# Interpret mode does not hold tiles to TPU's (8, 128) rule: small ones keep it fast and still
# span several blocks per side (L = 60 pads to 64).
BLOCKS = flash.BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=32)


@jax.jit
def _tpu_and_grads(q, k, v, ct, segment, horizon):
  f = lambda q, k, v: flash.flash_attention(q, k, v, segment, horizon, block_sizes=BLOCKS,
                                            lowering=flash_tpu.MOSAIC, interpret=True)
  out, vjp = jax.vjp(f, q, k, v)
  return out, vjp(ct.astype(out.dtype))


def test_tpu_kernels_match_dense_outputs_and_gradients():
  batch, segment, horizon = _packing(1, B=1, L=60)  # one row: interpret mode is slow
  assert batch["segment_ids"].max() == 4 and batch["image_ids"].max() == 3
  assert (batch["segment_ids"] == 0).any()
  q, k, v, ct = _qkv(1, 1, 60, 2, 1, 16)  # 2 query heads on 1 KV head; head dim padded to 128
  out_d, grads_d = _dense_and_grads(q, k, v, ct, segment, horizon)
  out_t, grads_t = _tpu_and_grads(q, k, v, ct, segment, horizon)
  np.testing.assert_allclose(out_t, out_d, atol=2e-5)
  for name, gt, gd in zip("qkv", grads_t, grads_d):
    np.testing.assert_allclose(gt, gd, atol=5e-5, err_msg=f"d{name}")


def test_tpu_kernels_in_bf16_are_within_bf16_rounding():
  batch, segment, horizon = _packing(6, B=1, L=60)
  assert batch["segment_ids"].max() == 3 and batch["image_ids"].max() == 2
  q, k, v, ct = _qkv(6, 1, 60, 2, 2, 16, jnp.bfloat16)
  out_d, grads_d = _dense_and_grads(*(x.astype(jnp.float32) for x in (q, k, v)), ct, segment, horizon)
  out_t, grads_t = _tpu_and_grads(q, k, v, ct, segment, horizon)
  assert out_t.dtype == jnp.bfloat16 and _rel(out_t, out_d) < 1e-2
  for gt, gd in zip(grads_t, grads_d):
    assert gt.dtype == jnp.bfloat16 and _rel(gt, gd) < 2e-2


def test_skipped_tiles_are_not_fetched():
  """Over one program's steps the clamped index maps name exactly the blocks of its walked range,
  each in one run (a repeated index is not copied again); an empty range names block 0 only."""
  seg = jnp.asarray([[1] * 64 + [2] * 48 + [0] * 16])  # two text segments, then a padding block
  hor, first, last, q_first = flash._bounds(seg, jnp.arange(128)[None])
  for lo_BL, hi_BL, expect in (
      (first, hor, [(0, b + 1) if b < 4 else (4, b + 1) for b in range(7)] + [(0, 0)]),
      (q_first, last, [(b, 4) if b < 4 else (b, 7) for b in range(7)] + [(0, 0)])):
    lo, hi = flash_tpu._ranges(lo_BL, hi_BL, 16, 16)
    assert list(zip(np.asarray(lo).tolist(), np.asarray(hi).tolist())) == expect
    walk = jax.vmap(jax.vmap(lambda r, j: flash_tpu._walked(lo, hi, r, j), (None, 0)), (0, None))
    fetched_RJ = np.asarray(walk(jnp.arange(8), jnp.arange(8))).tolist()  # block r, step j
    for r, ((a, b), fetched) in enumerate(zip(expect, fetched_RJ)):
      runs = [x for i, x in enumerate(fetched) if i == 0 or x != fetched[i - 1]]
      assert runs == (list(range(a, b)) or [0]), (r, fetched)


def test_flash_on_tpu_selects_the_mosaic_kernels(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention.implementation("flash") == "flash_tpu"
  assert attention.implementation("auto") == "dense"  # until measured on a TPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.implementation("flash") == "flash"
  assert attention.implementation("auto") == "dense"  # until measured on a GPU


def _lower(lowering, platform, block_sizes=None):
  """Forward and backward at a training shape (bf16, head dim 128, 4096 positions), lowered for
  `platform` from this CPU; returns the custom calls' targets."""
  B, L, H, G, K = 2, 4096, 8, 4, 128
  qkv = [jax.ShapeDtypeStruct((B, L, h, K), jnp.bfloat16) for h in (H, G, G)]
  row = jax.ShapeDtypeStruct((B, L), jnp.int32)

  def f(q, k, v, segment, horizon):
    out, vjp = jax.vjp(lambda q, k, v: flash.flash_attention(
        q, k, v, segment, horizon, block_sizes=block_sizes, lowering=lowering), q, k, v)
    return out, vjp(out)

  text = jax.jit(f).trace(*qkv, row, row).lower(lowering_platforms=(platform,)).as_text()
  return [line.split("custom_call @")[1].split("(")[0] for line in text.splitlines()
          if "custom_call @" in line]


def test_mosaic_kernels_lower_for_tpu():
  assert _lower(flash_tpu.MOSAIC, "tpu") == ["tpu_custom_call"] * 3
  # the lowering enforces TPU tiling: a 64-key tile makes the key-segment row (1, 64)
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    _lower(flash_tpu.MOSAIC, "tpu", flash.BlockSizes(128, 64, 128, 128))


def test_triton_kernels_lower_for_cuda():
  assert _lower(flash.TRITON, "cuda") == ["__gpu$xla.gpu.triton"] * 3


def test_model_attention_flash_tpu_lowers_to_the_mosaic_kernels():
  """What a model's attention runs under model.attention=flash on a TPU."""
  q = jax.ShapeDtypeStruct((2, 512, 4, 64), jnp.bfloat16)
  row = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  f = lambda q, s, h: attention._sharded_flash(q, q, q, s, h, "flash_tpu")
  text = jax.jit(f).trace(q, row, row).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("custom_call @tpu_custom_call") == 1
