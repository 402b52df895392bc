"""Flash attention for the Transfusion mask, in Pallas: forward and backward kernels.

The mask is the one of tfx/model/attention.py, given as data, never as an [L, S] matrix:

    visible(i, j) = segment[i] == segment[j] != 0  and  j <= horizon[i]

Each program owns one block of queries (forward, dQ) or keys (dK/dV) and walks only
the blocks of the other side that can hold a visible pair:

  - query block -> key blocks from the first index of the earliest segment among its
    queries to the block's largest horizon (text is causal, an image reaches its end);
  - key block -> query blocks from the first query whose running maximum horizon
    reaches the block's first key to the last query of the block's last segment.

Those bounds are conservative for any (segment, horizon) data, so the exact mask is
applied inside each tile as well; when segments are contiguous and horizons grow with
the index (every packed record), they skip every tile that is entirely hidden.

Online softmax in fp32 (base 2), bf16 or fp32 operands, grouped KV heads, and rows
that see no key give zeros. This module holds what every backend shares (the bounds,
the tile math, padding, the custom VJP) and the kernels in Pallas' Triton lowering
(NVIDIA GPUs, `TRITON`); tfx/model/flash_tpu.py holds the same kernels for Mosaic
(TPUs, `flash_tpu.MOSAIC`). `interpret=True` runs either on any backend (the CPU tests).
"""
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_LOG2E = math.log2(math.e)
_NEG = -1e30  # finite: a fully hidden row keeps m = _NEG and p = 0 without inf - inf


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (Triton: powers of two >= 16; Mosaic: multiples of 128) and Triton launch settings."""
  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int = 4
  num_stages: int = 2


def _span(lo, hi, block):
  """[first, end) block indices covering positions lo..hi (an empty range when hi < lo)."""
  first = lo // block
  return first, jnp.where(hi >= lo, hi // block + 1, first)


def _dot_t(a, b):
  """a @ b.T with fp32 accumulation."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):
  """a.T @ b with fp32 accumulation."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ---- the tile math both lowerings share ---------------------------------------------------------
# Per-query values (m, l, lse, delta) are vectors [bq] in the Triton kernels and columns [bq, 1] in
# the Mosaic ones (TPU vectors are 2-D); _col makes either a column against a [bq, bk] tile.


def _col(x):
  return x if x.ndim == 2 else x[:, None]


def _mask(q_seg, q_hor, k_seg, k_idx):
  """The mask tile [bq, bk] from query columns (segment, horizon) and key rows (segment, index)."""
  return (q_seg == k_seg) & (q_seg != 0) & (k_idx <= q_hor)


def _softmax_step(s, mask, v, acc, m, l):
  """One key tile of the online softmax (scores s in base 2): the new (acc, m, l)."""
  keep = m.ndim == 2
  m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _NEG), axis=1, keepdims=keep))
  p = jnp.where(mask, jnp.exp2(s - _col(m_new)), 0.0)
  correction = jnp.exp2(m - m_new)
  acc = acc * _col(correction) + _dot(p.astype(v.dtype), v)
  return acc, m_new, l * correction + jnp.sum(p, axis=1, keepdims=keep)


def _normalized(acc, m, l):
  """(out, lse in base 2) from the running sums; a row that saw no key gives zeros."""
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  return jnp.where(_col(seen), acc / _col(l_safe), 0.0), jnp.where(seen, m + jnp.log2(l_safe), 0.0)


def _grad_tile(q, k, v, do, mask, lse, delta, scale):
  """The probabilities p and dS = p * (dO V^T - delta) of one tile, from the saved lse."""
  p = jnp.where(mask, jnp.exp2(_dot_t(q, k) * (scale * _LOG2E) - _col(lse)), 0.0)
  return p, p * (_dot_t(do, v) - _col(delta))


# ---- Triton kernels ------------------------------------------------------------------------------
# One program per (block, row, head), holding the per-position vectors whole and looping with
# lax.fori_loop over the other side's blocks between the bounds it reads from them.


def _k_idx(k0, block_k):
  return (k0 + jnp.arange(block_k, dtype=jnp.int32))[None, :]


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, hor_ref, first_ref, o_ref, lse_ref, *,
                    scale, block_q, block_k):
  q0 = pl.program_id(0) * block_q
  q = q_ref[...]
  q_seg = seg_ref[pl.ds(q0, block_q)][:, None]
  q_hor = hor_ref[pl.ds(q0, block_q)]
  kb_lo, kb_hi = _span(jnp.min(first_ref[pl.ds(q0, block_q)]), jnp.max(q_hor), block_k)

  def body(kb, carry):
    k0 = kb * block_k
    s = _dot_t(q, k_ref[pl.ds(k0, block_k), :]) * (scale * _LOG2E)
    mask = _mask(q_seg, q_hor[:, None], seg_ref[pl.ds(k0, block_k)][None, :], _k_idx(k0, block_k))
    return _softmax_step(s, mask, v_ref[pl.ds(k0, block_k), :], *carry)

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), _NEG, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  o, lse = _normalized(*jax.lax.fori_loop(kb_lo, kb_hi, body, carry))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, hor_ref, qfirst_ref,
                 last_ref, dk_ref, dv_ref, *, scale, block_q, block_k):
  k0 = pl.program_id(0) * block_k
  k = k_ref[...]
  v = v_ref[...]
  k_seg = seg_ref[pl.ds(k0, block_k)][None, :]
  qb_lo, qb_hi = _span(jnp.min(qfirst_ref[pl.ds(k0, block_k)]), jnp.max(last_ref[pl.ds(k0, block_k)]),
                       block_q)

  def body(qb, carry):
    dk, dv = carry
    q0 = qb * block_q
    q = q_ref[pl.ds(q0, block_q), :]
    do = do_ref[pl.ds(q0, block_q), :]
    mask = _mask(seg_ref[pl.ds(q0, block_q)][:, None], hor_ref[pl.ds(q0, block_q)][:, None], k_seg,
                 _k_idx(k0, block_k))
    p, ds = _grad_tile(q, k, v, do, mask, lse_ref[pl.ds(q0, block_q)], delta_ref[pl.ds(q0, block_q)],
                       scale)
    return dk + _t_dot(ds.astype(q.dtype), q), dv + _t_dot(p.astype(do.dtype), do)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(qb_lo, qb_hi, body, (zeros, zeros))
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, hor_ref, first_ref, dq_ref, *,
               scale, block_q, block_k):
  q0 = pl.program_id(0) * block_q
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_seg = seg_ref[pl.ds(q0, block_q)][:, None]
  q_hor = hor_ref[pl.ds(q0, block_q)]
  kb_lo, kb_hi = _span(jnp.min(first_ref[pl.ds(q0, block_q)]), jnp.max(q_hor), block_k)

  def body(kb, dq):
    k0 = kb * block_k
    k = k_ref[pl.ds(k0, block_k), :]
    mask = _mask(q_seg, q_hor[:, None], seg_ref[pl.ds(k0, block_k)][None, :], _k_idx(k0, block_k))
    _, ds = _grad_tile(q, k, v_ref[pl.ds(k0, block_k), :], do, mask, lse, delta, scale)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(kb_lo, kb_hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _triton_params(bs: BlockSizes):
  return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _row(L):  # a [B, L] int row, whole
  return pl.BlockSpec((None, L), lambda i, b, h: (b, 0))


def _triton_forward(q, k, v, seg, hor, first, *, scale: float, bs: BlockSizes, interpret):
  B, L, H, K = q.shape
  R = H // k.shape[2]
  kernel = functools.partial(_forward_kernel, scale=scale, block_q=bs.block_q, block_k=bs.block_k)
  q_block = pl.BlockSpec((None, bs.block_q, None, K), lambda i, b, h: (b, i, h, 0))
  kv_whole = pl.BlockSpec((None, L, None, K), lambda i, b, h: (b, 0, h // R, 0))
  return pl.pallas_call(
      kernel, grid=(L // bs.block_q, B, H),
      in_specs=[q_block, kv_whole, kv_whole, _row(L), _row(L), _row(L)],
      out_specs=[q_block, pl.BlockSpec((None, None, bs.block_q), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, L), jnp.float32)],
      compiler_params=_triton_params(bs), interpret=interpret, name="tfx_flash_forward",
  )(q, k, v, seg, hor, first)


def _triton_backward(q, k, v, do, lse, delta, seg, hor, first, last, q_first, *, scale: float,
                     bs: BlockSizes, interpret):
  B, L, H, K = q.shape
  R = H // k.shape[2]
  whole = pl.BlockSpec((None, L, None, K), lambda i, b, h: (b, 0, h, 0))
  whole_kv = pl.BlockSpec((None, L, None, K), lambda i, b, h: (b, 0, h // R, 0))
  stat_whole = pl.BlockSpec((None, None, L), lambda i, b, h: (b, h, 0))

  bk = bs.block_k_bwd
  k_block = pl.BlockSpec((None, bk, None, K), lambda i, b, h: (b, i, h // R, 0))
  dk_block = pl.BlockSpec((None, bk, None, K), lambda i, b, h: (b, i, h, 0))
  dk_H, dv_H = pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=scale, block_q=bs.block_q_bwd, block_k=bk),
      grid=(L // bk, B, H),
      in_specs=[whole, k_block, k_block, whole, stat_whole, stat_whole, _row(L), _row(L), _row(L), _row(L)],
      out_specs=[dk_block, dk_block],
      out_shape=[jax.ShapeDtypeStruct((B, L, H, K), jnp.float32)] * 2,
      compiler_params=_triton_params(bs), interpret=interpret, name="tfx_flash_dkdv",
  )(q, k, v, do, lse, delta, seg, hor, q_first, last)

  bq = bs.block_q_bwd
  q_block = pl.BlockSpec((None, bq, None, K), lambda i, b, h: (b, i, h, 0))
  stat_block = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_q=bq, block_k=bs.block_k_bwd),
      grid=(L // bq, B, H),
      in_specs=[q_block, whole_kv, whole_kv, q_block, stat_block, stat_block, _row(L), _row(L), _row(L)],
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_triton_params(bs), interpret=interpret, name="tfx_flash_dq",
  )(q, k, v, do, lse, delta, seg, hor, first)
  return dq, dk_H, dv_H


@dataclasses.dataclass(frozen=True)
class Lowering:
  """The kernels for one backend, on padded [B, L, heads, K] operands:
  forward(q, k, v, seg, hor, first) -> (out, lse [B, H, L] base 2) and
  backward(q, k, v, do, lse, delta, seg, hor, first, last, q_first) -> (dq, and dk, dv per query
  head in fp32), both with keywords scale, bs, interpret; head_dim(K) pads the head dim;
  `blocks` are the default tiles."""
  forward: Callable
  backward: Callable
  head_dim: Callable[[int], int]
  blocks: BlockSizes


TRITON = Lowering(_triton_forward, _triton_backward, lambda K: max(16, 1 << (K - 1).bit_length()),
                  BlockSizes())


# ---- the mask's block bounds ----------------------------------------------------------------------


def _bounds(segment_BL, horizon_BL):
  """Per position: horizon (-1 on padding), first / last index of its segment, and, as a key,
  the first query whose running maximum horizon reaches it (padding: neutral values)."""
  B, L = segment_BL.shape
  idx_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  real_BL = segment_BL != 0
  horizon_BL = jnp.where(real_BL, horizon_BL, -1).astype(jnp.int32)
  ids = (segment_BL + (L + 1) * jnp.arange(B)[:, None]).reshape(-1)
  n = B * (L + 1)
  first = jax.ops.segment_min(idx_BL.reshape(-1), ids, n)[ids].reshape(B, L)
  last = jax.ops.segment_max(idx_BL.reshape(-1), ids, n)[ids].reshape(B, L)
  running_BL = jax.lax.cummax(horizon_BL, axis=1)
  q_first_BL = jax.vmap(lambda r: jnp.searchsorted(r, jnp.arange(L, dtype=jnp.int32), side="left"))(running_BL)
  first = jnp.where(real_BL, first, L).astype(jnp.int32)
  last = jnp.where(real_BL, last, -1).astype(jnp.int32)
  q_first_BL = jnp.where(real_BL, q_first_BL, L).astype(jnp.int32)
  return horizon_BL, first, last, q_first_BL


# ---- the custom VJP, padding and the entry point --------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, seg, hor, first, extra, scale, bs, lowering, interpret):
  return lowering.forward(q, k, v, seg, hor, first, scale=scale, bs=bs, interpret=interpret)[0]


def _flash_fwd(q, k, v, seg, hor, first, extra, scale, bs, lowering, interpret):
  o, lse = lowering.forward(q, k, v, seg, hor, first, scale=scale, bs=bs, interpret=interpret)
  # named so that a remat policy can keep the kernel's outputs instead of running it again
  o, lse = checkpoint_name(o, "attention_out"), checkpoint_name(lse, "attention_lse")
  return o, (q, k, v, o, lse, seg, hor, first, extra)


def _flash_bwd(scale, bs, lowering, interpret, res, do):
  q, k, v, o, lse, seg, hor, first, extra = res
  last, q_first = extra
  B, L, G, K = k.shape
  delta = jnp.einsum("blhk,blhk->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
  dq, dk_H, dv_H = lowering.backward(q, k, v, do, lse, delta, seg, hor, first, last, q_first,
                                     scale=scale, bs=bs, interpret=interpret)
  # grouped heads: each query head's share of its KV head's gradient, summed in fp32
  dk = dk_H.reshape(B, L, G, -1, K).sum(3).astype(k.dtype)
  dv = dv_H.reshape(B, L, G, -1, K).sum(3).astype(v.dtype)
  return dq, dk, dv, None, None, None, (None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x, axis, size, value=0):
  pad = size - x.shape[axis]
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def flash_attention(q_BLHK, k_BLGK, v_BLGK, segment_BL, horizon_BL, *,
                    block_sizes: BlockSizes | None = None, lowering: Lowering = TRITON,
                    interpret: bool = False):
  """Self-attention under the Transfusion mask (keys are the queries' own positions).

  Any length: the sequence is padded to a multiple of the blocks (padding is segment 0)
  and the head dim as the lowering needs, both cut off again. `lowering`: TRITON (GPU) or
  flash_tpu.MOSAIC (TPU); block_sizes default to the lowering's.
  """
  B, L, H, K = q_BLHK.shape
  if H % k_BLGK.shape[2]:
    raise ValueError(f"{H} query heads are not a multiple of {k_BLGK.shape[2]} KV heads")
  bs = block_sizes or lowering.blocks
  block = math.lcm(bs.block_q, bs.block_k, bs.block_q_bwd, bs.block_k_bwd)
  Lp = -(-L // block) * block
  pad = lambda x: _pad_to(_pad_to(x, 1, Lp), 3, lowering.head_dim(K))
  q, k, v = pad(q_BLHK), pad(k_BLGK), pad(v_BLGK)
  seg = _pad_to(segment_BL.astype(jnp.int32), 1, Lp)
  hor, first, last, q_first = _bounds(seg, _pad_to(horizon_BL.astype(jnp.int32), 1, Lp))
  out = _flash(q, k, v, seg, hor, first, (last, q_first), K ** -0.5, bs, lowering, interpret)
  return out[:, :L, :, :K]
