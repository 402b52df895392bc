"""The kernels of tfx/model/flash.py in Pallas' Mosaic lowering (TPUs): `MOSAIC`.

Same algorithm, mask, block bounds, tile math and custom VJP (all in flash.py); what
differs is how a TPU runs a kernel. The grid is (row, head, block, walked block): the
last axis runs in order over the other side's blocks while the fp32 accumulators stay
in VMEM scratch, and each operand's tile reaches VMEM through its BlockSpec (Pallas
pipelines the copies). Each block's walked range [lo, hi) is computed before the call
and prefetched into SMEM as scalars; the index maps clamp the walked block into that
range, so a step outside it names the tile already in VMEM (no copy) and `pl.when`
skips its compute.

TPU tiling wants a block's last two dims to be multiples of (8, 128) or whole: heads
are addressed in a [B, L, heads * K] view with K padded to a multiple of 128, per-query
values (segment, horizon, lse, delta) are [.., L, 1] columns, key segments a [B, 1, L]
row, and tiles are multiples of 128. Default tiles are 128 everywhere: not tuned on a TPU.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tfx.model import flash
from tfx.model.flash import _LOG2E, _NEG, _dot, _dot_t, _grad_tile, _mask, _normalized, _t_dot

_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _k_idx(kb, block_k):
  """Key indices of block kb as a row [1, block_k] (TPU iotas are 2-D)."""
  return kb * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)


def _walked(lo_ref, hi_ref, r, j):
  """Step j's block clamped into block r's walked range: the tile to have in VMEM."""
  lo = lo_ref[r]
  return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi_ref[r] - 1, lo))


def _in_range(lo_ref, hi_ref, r, j):
  return (lo_ref[r] <= j) & (j < hi_ref[r])


def _ranges(lo_BL, hi_BL, block, walk_block):
  """Per block of `block` positions, the [lo, hi) blocks of `walk_block` positions it walks, flat
  [B * n] (SMEM); an empty range is (0, 0), so that clamped index maps stay inside the array."""
  B = lo_BL.shape[0]
  lo, hi = flash._span(lo_BL.reshape(B, -1, block).min(-1), hi_BL.reshape(B, -1, block).max(-1),
                       walk_block)
  walks = hi > lo
  return jnp.where(walks, lo, 0).reshape(-1), jnp.where(walks, hi, 0).reshape(-1)


# ---- kernels: refs are (lo, hi) scalars, then inputs, outputs, scratch ------------------------------


def _forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qseg_ref, qhor_ref, kseg_ref, o_ref, lse_ref,
                    acc_ref, m_ref, l_ref, *, scale, block_k, n_q):
  r, j = pl.program_id(0) * n_q + pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  @pl.when(_in_range(lo_ref, hi_ref, r, j))
  def _step():
    s = _dot_t(q_ref[...], k_ref[...]) * (scale * _LOG2E)
    mask = _mask(qseg_ref[...], qhor_ref[...], kseg_ref[...], _k_idx(j, block_k))
    acc, m, l = flash._softmax_step(s, mask, v_ref[...], acc_ref[...], m_ref[...], l_ref[...])
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    o, lse = _normalized(acc_ref[...], m_ref[...], l_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dkdv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, qhor_ref,
                 kseg_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, scale, block_k, n_k):
  kb, i = pl.program_id(2), pl.program_id(3)
  r = pl.program_id(0) * n_k + kb

  @pl.when(i == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  @pl.when(_in_range(lo_ref, hi_ref, r, i))
  def _step():
    q, do = q_ref[...], do_ref[...]
    mask = _mask(qseg_ref[...], qhor_ref[...], kseg_ref[...], _k_idx(kb, block_k))
    p, ds = _grad_tile(q, k_ref[...], v_ref[...], do, mask, lse_ref[...], delta_ref[...], scale)
    dk_acc[...] += _t_dot(ds.astype(q.dtype), q)
    dv_acc[...] += _t_dot(p.astype(do.dtype), do)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_acc[...] * scale
    dv_ref[...] = dv_acc[...]


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, qhor_ref,
               kseg_ref, dq_ref, dq_acc, *, scale, block_k, n_q):
  r, j = pl.program_id(0) * n_q + pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  @pl.when(_in_range(lo_ref, hi_ref, r, j))
  def _step():
    k = k_ref[...]
    mask = _mask(qseg_ref[...], qhor_ref[...], kseg_ref[...], _k_idx(j, block_k))
    _, ds = _grad_tile(q_ref[...], k, v_ref[...], do_ref[...], mask, lse_ref[...], delta_ref[...], scale)
    dq_acc[...] += _dot(ds.astype(k.dtype), k)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


# ---- pallas calls ---------------------------------------------------------------------------------
# Index maps get (b, h, block, step, lo_ref, hi_ref). `n` is the number of blocks on the program's
# own side, so that block r = b * n + block indexes the flat ranges. KV heads are lax.div(h, R), not
# h // R: floor division lowers through `sign`, whose Mosaic rule asks the TPU generation and so
# fails to lower from a machine without a TPU (tests/test_flash_tpu.py lowers from a CPU).


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, interpret, name):
  return pl.pallas_call(
      kernel, out_shape=out_shape, name=name, compiler_params=_SEMANTICS,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      interpret=pltpu.InterpretParams() if interpret else False)


def _specs(bq, bk, K, R, n, walk_keys: bool):
  """BlockSpecs of (q-side tile, kv tile, query column, per-head query stat, key-segment row) for
  programs that own query blocks and walk key blocks (walk_keys) or the other way round."""
  def blocks(b, own, step, lo, hi):  # (query block, key block)
    walked = _walked(lo, hi, b * n + own, step)
    return (own, walked) if walk_keys else (walked, own)
  return (
      pl.BlockSpec((None, bq, K), lambda b, h, o, s, lo, hi: (b, blocks(b, o, s, lo, hi)[0], h)),
      pl.BlockSpec((None, bk, K), lambda b, h, o, s, lo, hi: (b, blocks(b, o, s, lo, hi)[1], jax.lax.div(h, R))),
      pl.BlockSpec((None, bq, 1), lambda b, h, o, s, lo, hi: (b, blocks(b, o, s, lo, hi)[0], 0)),
      pl.BlockSpec((None, None, bq, 1), lambda b, h, o, s, lo, hi: (b, h, blocks(b, o, s, lo, hi)[0], 0)),
      pl.BlockSpec((None, 1, bk), lambda b, h, o, s, lo, hi: (b, 0, blocks(b, o, s, lo, hi)[1])),
  )


def _views(q, k, seg, hor):
  """[B, L, heads * K] operands, query columns [B, L, 1] and the key-segment row [B, 1, L]."""
  B, L, H, K = q.shape
  return (q.reshape(B, L, H * K), k.reshape(B, L, -1), seg[:, :, None], hor[:, :, None],
          seg[:, None, :])


def _forward(q, k, v, seg, hor, first, *, scale: float, bs: flash.BlockSizes, interpret):
  B, L, H, K = q.shape
  R = H // k.shape[2]
  bq, bk = bs.block_q, bs.block_k
  n_q = L // bq
  lo, hi = _ranges(first, hor, bq, bk)
  q3, k3, seg_col, hor_col, seg_row = _views(q, k, seg, hor)
  q_tile, kv_tile, col, stat, row = _specs(bq, bk, K, R, n_q, walk_keys=True)
  o, lse = _call(
      functools.partial(_forward_kernel, scale=scale, block_k=bk, n_q=n_q),
      grid=(B, H, n_q, L // bk), in_specs=[q_tile, kv_tile, kv_tile, col, col, row],
      out_specs=[q_tile, stat],
      out_shape=[jax.ShapeDtypeStruct(q3.shape, q.dtype), jax.ShapeDtypeStruct((B, H, L, 1), jnp.float32)],
      scratch=[pltpu.VMEM((bq, K), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
               pltpu.VMEM((bq, 1), jnp.float32)],
      interpret=interpret, name="tfx_flash_forward_tpu",
  )(lo, hi, q3, k3, v.reshape(k3.shape), seg_col, hor_col, seg_row)
  return o.reshape(q.shape), lse[..., 0]


def _backward(q, k, v, do, lse, delta, seg, hor, first, last, q_first, *, scale: float,
              bs: flash.BlockSizes, interpret):
  B, L, H, K = q.shape
  R = H // k.shape[2]
  bq, bk = bs.block_q_bwd, bs.block_k_bwd
  q3, k3, seg_col, hor_col, seg_row = _views(q, k, seg, hor)
  operands = (q3, k3, v.reshape(k3.shape), do.reshape(q3.shape), lse[..., None], delta[..., None],
              seg_col, hor_col, seg_row)

  n_k = L // bk
  q_tile, kv_tile, col, stat, row = _specs(bq, bk, K, R, n_k, walk_keys=False)
  dk_tile = pl.BlockSpec((None, bk, K), lambda b, h, kb, i, lo, hi: (b, kb, h))
  dk_H, dv_H = _call(
      functools.partial(_dkdv_kernel, scale=scale, block_k=bk, n_k=n_k),
      grid=(B, H, n_k, L // bq),
      in_specs=[q_tile, kv_tile, kv_tile, q_tile, stat, stat, col, col, row],
      out_specs=[dk_tile, dk_tile], out_shape=[jax.ShapeDtypeStruct(q3.shape, jnp.float32)] * 2,
      scratch=[pltpu.VMEM((bk, K), jnp.float32)] * 2, interpret=interpret, name="tfx_flash_dkdv_tpu",
  )(*_ranges(q_first, last, bk, bq), *operands)

  n_q = L // bq
  q_tile, kv_tile, col, stat, row = _specs(bq, bk, K, R, n_q, walk_keys=True)
  dq = _call(
      functools.partial(_dq_kernel, scale=scale, block_k=bk, n_q=n_q),
      grid=(B, H, n_q, n_k),
      in_specs=[q_tile, kv_tile, kv_tile, q_tile, stat, stat, col, col, row],
      out_specs=q_tile, out_shape=jax.ShapeDtypeStruct(q3.shape, q.dtype),
      scratch=[pltpu.VMEM((bq, K), jnp.float32)], interpret=interpret, name="tfx_flash_dq_tpu",
  )(*_ranges(first, hor, bq, bk), *operands)
  return dq.reshape(q.shape), dk_H.reshape(q.shape), dv_H.reshape(q.shape)


MOSAIC = flash.Lowering(_forward, _backward, lambda K: -(-K // 128) * 128,
                        flash.BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128))
