"""Transfusion attention: the mask as (segment, horizon) data, a dense kernel, and the KV cache.

The mask, per query i and key j (indices into the sequence):

    visible(i, j) = segment[i] == segment[j] != 0  and  j <= horizon[i]

with horizon[i] = i for a text position and the index of the last patch of
its image for an image patch. So text is causal, the patches of one image see
each other (and everything before the image), and nothing crosses packed
segments or touches padding (segment 0). `model.image_attention = "causal"`
(the paper's ablation) sets horizon[i] = i on patches too: every path below
(dense, flash, KV cache) then gives the plain causal mask. `model.attention`
picks how it is computed: "dense" builds the [L, S] boolean mask; "flash" runs the
kernels of tfx/model/flash.py, which take the two vectors and skip every tile they
hide (Triton on a GPU, Mosaic on a TPU, the Triton kernels in Pallas interpret mode
on a CPU: slow, exact); "auto" is dense everywhere until the kernels have been
measured on hardware.
Generation (a KV cache) stays dense: its queries are one token or one image's
patches against at most max_len keys, so the scores are [n, S], never [L, S].

KV cache (for generation; training passes cache=None):

    cache = model.init_cache(batch_size, max_len)          # empty, length 0
    logits, patch_out, cache = model(prefix_batch, t, cache=cache)

A call with a cache places its L new positions at sequence indices
[cache.length, cache.length + L), writes their keys/values there and attends
over [cached prefix ; themselves] with the rule above in those absolute
indices (every cached key precedes every new query, so only the segment test
matters for them). The returned cache has length + L. Calls are pure: to
denoise an image against a fixed prefix, call the model on the image's n
patches with the SAME prefix cache at every step and drop the returned cache
(or pass read_only=True: the step attends to [cache ; itself] and writes nothing);
commit the image (one more call on its final patches) only when it is done.
`cache.length` may also hold one length per row: each row then writes at its own
offset (rows that generate different amounts keep their own contiguous layout).
A chunk must hold whole images (an image never straddles the cache boundary)
and must fit: length + L <= max_len (checked when length is concrete; under
jit the caller sizes the cache, as an overflowing write would be clamped).
RoPE uses the batch's `positions`, so rows may be left-padded with segment 0.
"""
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tfx import mesh, record
from tfx.model import flash, flash_tpu, layers

_NEG = -1e30


@flax.struct.dataclass
class KVCache:
  """Keys/values of committed positions for every layer, and their segments."""
  k_NBSGK: jax.Array         # [layers, batch, max_len, kv_heads, head_dim]
  v_NBSGK: jax.Array
  segment_ids_BS: jax.Array  # int32 [batch, max_len]; 0 = empty slot
  length: jax.Array          # int32: committed positions, a scalar or one per row [batch]

  @property
  def max_len(self) -> int:
    return self.segment_ids_BS.shape[1]


def init_cache(n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> KVCache:
  """An empty cache with room for `max_len` positions."""
  shape = (n_layers, batch_size, max_len, n_kv_heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.zeros((batch_size, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def write_at(buffer_BS, new_BL, offset):
  """buffer[:, offset:offset + L] = new along axis 1; offset is a scalar or one per row."""
  rest = (0,) * (buffer_BS.ndim - 2)
  if jnp.ndim(offset) == 0:
    return jax.lax.dynamic_update_slice(buffer_BS, new_BL, (0, offset) + rest)
  return jax.vmap(lambda b, n, o: jax.lax.dynamic_update_slice(b, n, (o,) + rest))(buffer_BS, new_BL, offset)


IMAGE_ATTENTION = ("bidirectional", "causal")


def check_image_attention(name: str) -> str:
  if name not in IMAGE_ATTENTION:
    raise ValueError(f"model.image_attention must be one of {IMAGE_ATTENTION}, got {name!r}")
  return name


def horizon(image_ids_BL, modality_BL, image_attention: str = "bidirectional"):
  """Per-query horizon (local index): i on text, the last index of its image on a patch
  ("bidirectional"), or i everywhere ("causal": a patch sees only earlier patches of its image)."""
  check_image_attention(image_attention)
  L = image_ids_BL.shape[-1]
  idx_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), image_ids_BL.shape)
  if image_attention == "causal":
    return idx_BL
  is_image_BL = modality_BL == record.IMAGE
  next_ids_BL = jnp.concatenate([image_ids_BL[:, 1:], jnp.zeros_like(image_ids_BL[:, :1])], axis=1)
  next_image_BL = jnp.concatenate([is_image_BL[:, 1:], jnp.zeros_like(is_image_BL[:, :1])], axis=1)
  is_last_BL = is_image_BL & ~(next_image_BL & (next_ids_BL == image_ids_BL))
  last_BL = jax.lax.cummin(jnp.where(is_last_BL, idx_BL, L), axis=1, reverse=True)
  return jnp.where(is_image_BL, last_BL, idx_BL)


def dense_mask(q_segment_BL, q_horizon_BL, k_segment_BS):
  """mask_BLS[b, i, s] = visible(i, s); key s's index is s, query horizons are absolute."""
  S = k_segment_BS.shape[-1]
  same_BLS = (q_segment_BL[:, :, None] == k_segment_BS[:, None, :]) & (q_segment_BL[:, :, None] != 0)
  return same_BLS & (jnp.arange(S)[None, None, :] <= q_horizon_BL[:, :, None])


IMPLEMENTATIONS = ("auto", "dense", "flash")


def implementation(name: str) -> str:
  """config.model.attention resolved for this backend: "dense", "flash" (Triton, GPU), "flash_tpu"
  (Mosaic, TPU) or "flash_interpret" (the Triton kernels in Pallas interpret mode, elsewhere).

  "auto" is "dense" on every backend: the kernels are checked in interpret mode and lowered for GPU
  and TPU from a CPU, but have not run or been timed on either (docs/scale.md); "flash" asks for them.
  """
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention must be one of {IMPLEMENTATIONS}, got {name!r}")
  if name != "flash":
    return "dense"
  return {"gpu": "flash", "tpu": "flash_tpu"}.get(jax.default_backend(), "flash_interpret")


@flax.struct.dataclass
class Mask:
  """The mask as data for one forward: query segments and absolute horizons, key segments, and
  the dense [B, L, S] matrix when the dense path needs it (None for flash)."""
  segment_BL: jax.Array
  horizon_BL: jax.Array
  k_segment_BS: jax.Array
  dense_BLS: jax.Array | None = None
  own_BLL: jax.Array | None = None  # read-only cache: the chunk's mask over its own keys (local indices)


def read_only_mask(segment_BL, horizon_BL, k_segment_BS) -> Mask:
  """The mask of a chunk that reads a cache without writing it: every cached key precedes the
  chunk (so only the segment test applies to it); the chunk's own keys use local horizons."""
  cached_BLS = (segment_BL[:, :, None] == k_segment_BS[:, None, :]) & (segment_BL[:, :, None] != 0)
  return Mask(segment_BL, horizon_BL, k_segment_BS, cached_BLS, dense_mask(segment_BL, horizon_BL, segment_BL))


def make_mask(segment_BL, horizon_BL, k_segment_BS, impl: str) -> Mask:
  dense = None if impl.startswith("flash") else dense_mask(segment_BL, horizon_BL, k_segment_BS)
  return Mask(segment_BL, horizon_BL, k_segment_BS, dense)


def flash_kernel(impl: str):
  """flash.flash_attention(q, k, v, segment, horizon) with the kernels of `impl`, one of
  implementation()'s flash results."""
  lowering = flash_tpu.MOSAIC if impl == "flash_tpu" else flash.TRITON
  return functools.partial(flash.flash_attention, lowering=lowering, interpret=impl == "flash_interpret")


def _sharded_flash(q_BLHK, k_BLGK, v_BLGK, segment_BL, horizon_BL, impl: str):
  """flash_kernel(impl), run per shard under the current mesh (batch over the data-like axes, heads
  over tensor): a Pallas call is opaque to XLA's partitioner, which would gather it whole."""
  run = flash_kernel(impl)
  abstract_mesh = jax.sharding.get_abstract_mesh()
  if abstract_mesh is None or abstract_mesh.empty:
    return run(q_BLHK, k_BLGK, v_BLGK, segment_BL, horizon_BL)
  qkv_spec = mesh.logical_to_spec(("act_batch", "act_len", "act_heads", "act_kv"))
  row_spec = mesh.logical_to_spec(("act_batch", "act_len"))
  splits = lambda spec, dim: math.prod(abstract_mesh.shape[a] for a in jax.tree.leaves(spec[dim]))
  if (q_BLHK.shape[0] % splits(qkv_spec, 0) or q_BLHK.shape[2] % splits(qkv_spec, 2)
      or k_BLGK.shape[2] % splits(qkv_spec, 2)):
    return run(q_BLHK, k_BLGK, v_BLGK, segment_BL, horizon_BL)
  return jax.shard_map(run, mesh=abstract_mesh, in_specs=(qkv_spec,) * 3 + (row_spec,) * 2,
                       out_specs=qkv_spec, check_vma=False)(q_BLHK, k_BLGK, v_BLGK, segment_BL, horizon_BL)


# Queries per block on long sequences: each block is rematerialized in the backward
# pass, so the fp32 scores live as [.., 512, S], never [.., L, S] (7B on 64 devices
# at 2M-token batches: 101 -> 35 GiB per device, measured with tfx.dryrun).
QUERY_BLOCK = 512


def dot_attention(q_BLHK, k_BSGK, v_BSGK, mask_BLS):
  """Softmax attention with grouped KV heads; rows with no visible key give zeros.

  Sequences longer than QUERY_BLOCK (and a multiple of it) run one query block at a time.
  """
  B, L, H, K = q_BLHK.shape
  if L <= QUERY_BLOCK or L % QUERY_BLOCK:
    return _dense_attention(q_BLHK, k_BSGK, v_BSGK, mask_BLS)
  n, S = L // QUERY_BLOCK, mask_BLS.shape[-1]
  q_NBCHK = q_BLHK.reshape(B, n, QUERY_BLOCK, H, K).swapaxes(0, 1)
  mask_NBCS = mask_BLS.reshape(B, n, QUERY_BLOCK, S).swapaxes(0, 1)
  block = jax.checkpoint(lambda qm: _dense_attention(qm[0], k_BSGK, v_BSGK, qm[1]))
  out_NBCHK = jax.lax.map(block, (q_NBCHK, mask_NBCS))
  return out_NBCHK.swapaxes(0, 1).reshape(B, L, H, K)


def _dense_attention(q_BLHK, k_BSGK, v_BSGK, mask_BLS):
  B, L, H, K = q_BLHK.shape
  G = k_BSGK.shape[2]
  q_BLGRK = q_BLHK.reshape(B, L, G, H // G, K)
  scores_BGRLS = jnp.einsum("blgrk,bsgk->bgrls", q_BLGRK, k_BSGK,
                            preferred_element_type=jnp.float32) * (K ** -0.5)
  mask_B11LS = mask_BLS[:, None, None]
  scores_BGRLS = jnp.where(mask_B11LS, scores_BGRLS, _NEG)
  probs_BGRLS = jax.nn.softmax(scores_BGRLS, axis=-1)
  probs_BGRLS = jnp.where(mask_B11LS.any(-1, keepdims=True), probs_BGRLS, 0.0)
  out_BLGRK = jnp.einsum("bgrls,bsgk->blgrk", probs_BGRLS.astype(v_BSGK.dtype), v_BSGK)
  return out_BLGRK.reshape(B, L, H, K)


def two_part_attention(q_BLHK, k_BSGK, v_BSGK, mask_BLS, k_BMGK, v_BMGK, mask_BLM):
  """Softmax attention over [cached keys S ; the chunk's own keys M], merged the way flash
  attention merges tiles, so the cache buffer is only read (never copied to append the chunk)."""
  B, L, H, K = q_BLHK.shape
  G = k_BSGK.shape[2]
  q_BLGRK = q_BLHK.reshape(B, L, G, H // G, K)

  def scores(k, mask, name):
    s = jnp.einsum(f"blgrk,b{name}gk->bgrl{name}", q_BLGRK, k, preferred_element_type=jnp.float32) * (K ** -0.5)
    return jnp.where(mask[:, None, None], s, _NEG)

  s_BGRLS, s_BGRLM = scores(k_BSGK, mask_BLS, "s"), scores(k_BMGK, mask_BLM, "m")
  m_BGRL1 = jnp.maximum(s_BGRLS.max(-1, keepdims=True), s_BGRLM.max(-1, keepdims=True))
  p_BGRLS, p_BGRLM = jnp.exp(s_BGRLS - m_BGRL1), jnp.exp(s_BGRLM - m_BGRL1)
  denom_BGRL1 = p_BGRLS.sum(-1, keepdims=True) + p_BGRLM.sum(-1, keepdims=True)
  out_BGRLK = (jnp.einsum("bgrls,bsgk->bgrlk", p_BGRLS.astype(v_BSGK.dtype), v_BSGK)
               + jnp.einsum("bgrlm,bmgk->bgrlk", p_BGRLM.astype(v_BMGK.dtype), v_BMGK)) / denom_BGRL1
  visible_B11L1 = (mask_BLS.any(-1) | mask_BLM.any(-1))[:, None, None, :, None]
  out_BGRLK = jnp.where(visible_B11L1, out_BGRLK, 0.0).astype(q_BLHK.dtype)
  return jnp.einsum("bgrlk->blgrk", out_BGRLK).reshape(B, L, H, K)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and optional QK-norm."""

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, qk_norm: bool,
               rope_theta: float, norm_eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               impl: str = "dense"):
    if n_heads % n_kv_heads:
      raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    self.q = layers.Dense((d_model,), (n_heads, head_dim), ("embed", "heads", "head_dim"),
                          rngs=rngs, dtype=dtype)
    self.k = layers.Dense((d_model,), (n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                          rngs=rngs, dtype=dtype)
    self.v = layers.Dense((d_model,), (n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                          rngs=rngs, dtype=dtype)
    self.o = layers.Dense((n_heads, head_dim), (d_model,), ("heads", "head_dim", "embed"),
                          rngs=rngs, dtype=dtype)
    self.q_norm = layers.RMSNorm(head_dim, eps=norm_eps, rngs=rngs) if qk_norm else None
    self.k_norm = layers.RMSNorm(head_dim, eps=norm_eps, rngs=rngs) if qk_norm else None
    self.rope_theta = rope_theta
    self.impl = impl

  def __call__(self, x_BLD, positions_BL, mask: Mask, layer_cache=None):
    """Returns (out_BLD, (k, v)). Without a cache the keys are the L new positions (S = L); with
    layer_cache=(k_BSGK, v_BSGK, offset) the new keys/values are written at `offset` and the full
    updated buffers are returned; with offset None the cache is only read (`read_only_mask`) and
    the chunk's own keys/values are returned. `mask` comes from `make_mask` (shared by all layers)."""
    q_BLHK = self.q(x_BLD)
    k_BLGK = self.k(x_BLD)
    v_BLGK = self.v(x_BLD)
    if self.q_norm is not None:
      q_BLHK, k_BLGK = self.q_norm(q_BLHK), self.k_norm(k_BLGK)
    q_BLHK = layers.rope(q_BLHK, positions_BL, self.rope_theta)
    k_BLGK = layers.rope(k_BLGK, positions_BL, self.rope_theta)
    q_BLHK = mesh.constrain(q_BLHK, ("act_batch", "act_len", "act_heads", "act_kv"))
    if layer_cache is not None and layer_cache[2] is None:
      k_cache, v_cache, _ = layer_cache
      out_BLHK = two_part_attention(q_BLHK, k_cache.astype(q_BLHK.dtype), v_cache.astype(q_BLHK.dtype),
                                    mask.dense_BLS, k_BLGK, v_BLGK, mask.own_BLL)
      return self.o(checkpoint_name(out_BLHK, "attention_out")), (k_BLGK, v_BLGK)
    if layer_cache is None:
      k_BSGK, v_BSGK = k_BLGK, v_BLGK
    else:
      k_cache, v_cache, offset = layer_cache
      k_BSGK = write_at(k_cache, k_BLGK.astype(k_cache.dtype), offset)
      v_BSGK = write_at(v_cache, v_BLGK.astype(v_cache.dtype), offset)
    k_BSGK_c, v_BSGK_c = k_BSGK.astype(q_BLHK.dtype), v_BSGK.astype(q_BLHK.dtype)
    if mask.dense_BLS is None:
      out_BLHK = _sharded_flash(q_BLHK, k_BSGK_c, v_BSGK_c, mask.segment_BL, mask.horizon_BL,
                                self.impl)
    else:
      out_BLHK = dot_attention(q_BLHK, k_BSGK_c, v_BSGK_c, mask.dense_BLS)
    out_BLHK = checkpoint_name(out_BLHK, "attention_out")
    return self.o(out_BLHK), (k_BSGK, v_BSGK)
