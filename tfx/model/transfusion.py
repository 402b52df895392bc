"""The Transfusion model: text embedding + modality layers -> Llama-style decoder -> LM head + image head."""
import jax
import jax.numpy as jnp
from flax import nnx

from tfx import image_codes, mesh, record
from tfx.model import attention, layers, modality

_ACT = ("act_batch", "act_len", "act_embed")


def dims(config) -> dict:
  """Resolved head_dim and mlp_dim (0 in the config means 'derive')."""
  m = config.model
  if not m.head_dim and m.d_model % m.n_heads:
    raise ValueError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
                     "set model.head_dim")
  head_dim = m.head_dim or m.d_model // m.n_heads
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  mlp_dim = m.mlp_dim or 64 * -(-(8 * m.d_model // 3) // 64)
  return dict(head_dim=head_dim, mlp_dim=mlp_dim)


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)); x + swiglu(norm(x))."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    m, d = config.model, dims(config)
    dtype = layers.compute_dtype(m.dtype)
    self.attn_norm = layers.RMSNorm(m.d_model, eps=m.norm_eps, rngs=rngs)
    self.attn = attention.Attention(m.d_model, m.n_heads, m.n_kv_heads, d["head_dim"], qk_norm=m.qk_norm,
                                    rope_theta=m.rope_theta, norm_eps=m.norm_eps, rngs=rngs, dtype=dtype,
                                    impl=attention.implementation(m.attention))
    self.mlp_norm = layers.RMSNorm(m.d_model, eps=m.norm_eps, rngs=rngs)
    self.mlp = layers.SwiGLU(m.d_model, d["mlp_dim"], rngs=rngs, dtype=dtype)

  def __call__(self, x_BLD, positions_BL, mask, layer_cache=None):
    h_BLD, kv = self.attn(self.attn_norm(x_BLD), positions_BL, mask, layer_cache)
    x_BLD = mesh.constrain(x_BLD + h_BLD, _ACT)
    x_BLD = mesh.constrain(x_BLD + self.mlp(self.mlp_norm(x_BLD)), _ACT)
    return x_BLD, kv


# model.remat: what each block keeps for the backward pass (one remat level, around the block);
# everything else is recomputed. "none" keeps everything (no remat).
_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,  # keeps only the block's input
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # matmul outputs
    "attention": lambda: jax.checkpoint_policies.save_only_these_names(  # attention outputs (+ lse)
        "attention_out", "attention_lse"),
    "dots_offload": lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims(  # matmul outputs,
        "device", "pinned_host"),                                                   # in host memory
}
REMAT = ("none",) + tuple(_POLICIES)


def _remat_policy(name: str):
  if name not in _POLICIES:
    raise ValueError(f"model.remat must be one of {REMAT}, got {name!r}")
  return _POLICIES[name]()


def _block_step(block, x_BLD, positions_BL, mask, layer_cache):
  return block(x_BLD, positions_BL, mask, layer_cache)


class Transfusion(nnx.Module):
  """One transformer over mixed text tokens and image patches (see tfx/model/attention.py)."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    m = config.model
    self.dtype = layers.compute_dtype(m.dtype)
    self.n_layers, self.n_kv_heads = m.n_layers, m.n_kv_heads
    self.head_dim = dims(config)["head_dim"]
    self.scan_layers = bool(m.scan_layers)
    self.remat = m.remat
    self.attention_impl = attention.implementation(m.attention)
    self.image_attention = attention.check_image_attention(m.image_attention)
    if self.remat != "none":
      _remat_policy(self.remat)
    vocab = image_codes.model_vocab(config)   # text, plus the VQ codes in image_mode "discrete"
    self.embed = layers.Embed(vocab, m.d_model, rngs=rngs, dtype=self.dtype)
    # discrete images are tokens: no patch layers (and nothing in the record is IMAGE)
    self.patches = None if image_codes.is_discrete(config) else modality.build(config, rngs=rngs, dtype=self.dtype)
    if self.scan_layers:
      @nnx.split_rngs(splits=m.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(rngs):
        return Block(config, rngs=rngs)
      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(m.n_layers)])
    self.final_norm = layers.RMSNorm(m.d_model, eps=m.norm_eps, rngs=rngs)
    self.lm_head = (None if m.tie_embeddings else
                    layers.Dense((m.d_model,), (vocab,), ("embed", "vocab"), rngs=rngs,
                                 dtype=self.dtype))

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> attention.KVCache:
    """An empty KV cache for generation (protocol in tfx/model/attention.py)."""
    return attention.init_cache(self.n_layers, batch_size, max_len, self.n_kv_heads, self.head_dim,
                                dtype or self.dtype)

  def _step_fn(self):
    if self.remat == "none":
      return _block_step
    return nnx.remat(_block_step, policy=_remat_policy(self.remat))

  def _run_blocks(self, x_BLD, positions_BL, segment_BL, horizon_BL, cache, read_only=False):
    step = self._step_fn()
    if cache is not None and read_only:
      return self._run_blocks_read_only(step, x_BLD, positions_BL, segment_BL, horizon_BL, cache), cache
    if cache is None:
      mask = attention.make_mask(segment_BL, horizon_BL, segment_BL, self.attention_impl)
      if self.scan_layers:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(x, block):
          return step(block, x, positions_BL, mask, None)[0]
        return run(x_BLD, self.blocks), None
      for block in self.blocks:
        x_BLD = step(block, x_BLD, positions_BL, mask, None)[0]
      return x_BLD, None

    offset, L = cache.length, segment_BL.shape[1]
    if L > cache.max_len or (not isinstance(offset, jax.core.Tracer) and int(jnp.max(offset)) + L > cache.max_len):
      raise ValueError(f"KV cache overflow: {L} new positions do not fit a cache of max_len {cache.max_len} "
                       f"holding {offset}")
    segment_BS = attention.write_at(cache.segment_ids_BS, segment_BL.astype(jnp.int32), offset)
    row_offset = offset[:, None] if jnp.ndim(offset) else offset
    mask = attention.make_mask(segment_BL, horizon_BL + row_offset, segment_BS, "dense")
    if self.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def run(x, block, k_BSGK, v_BSGK):
        x, kv = step(block, x, positions_BL, mask, (k_BSGK, v_BSGK, offset))
        return x, kv
      x_BLD, (k_N, v_N) = run(x_BLD, self.blocks, cache.k_NBSGK, cache.v_NBSGK)
    else:
      ks, vs = [], []
      for i, block in enumerate(self.blocks):
        x_BLD, (k, v) = step(block, x_BLD, positions_BL, mask, (cache.k_NBSGK[i], cache.v_NBSGK[i], offset))
        ks.append(k)
        vs.append(v)
      k_N, v_N = jnp.stack(ks), jnp.stack(vs)
    new_cache = attention.KVCache(k_N.astype(cache.k_NBSGK.dtype), v_N.astype(cache.v_NBSGK.dtype),
                                  segment_BS, offset + L)
    return x_BLD, new_cache

  def _run_blocks_read_only(self, step, x_BLD, positions_BL, segment_BL, horizon_BL, cache):
    """The blocks on a chunk placed after the cache, reading the cache and never writing it: a
    denoising step that writes its patches pays for a copy of the whole buffer (docs/generation.md)."""
    mask = attention.read_only_mask(segment_BL, horizon_BL, cache.segment_ids_BS)
    if self.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def run(x, block, k_BSGK, v_BSGK):
        return step(block, x, positions_BL, mask, (k_BSGK, v_BSGK, None))[0]
      return run(x_BLD, self.blocks, cache.k_NBSGK, cache.v_NBSGK)
    for i, block in enumerate(self.blocks):
      x_BLD = step(block, x_BLD, positions_BL, mask, (cache.k_NBSGK[i], cache.v_NBSGK[i], None))[0]
    return x_BLD

  def features(self, batch, t_BL, *, cache=None, read_only=False):
    """(h_BLD: final-normed hidden states, patch_out_BLP fp32 (0 off images), new_cache).

    read_only: the batch attends to the cache as if placed after it, and the cache is returned
    unchanged (a denoising step against a fixed prefix).
    The LM head is left to the caller (`logits`), so a loss can apply it to text positions only.
    """
    modality_BL = batch["modality"]
    segment_BL, positions_BL = batch["segment_ids"], batch["positions"]
    is_image_BL1 = (modality_BL == record.IMAGE)[..., None]
    x_BLD = text_BLD = self.embed(batch["tokens"])
    if self.patches is not None:
      image_BLD, ctx = self.patches.encode(batch["patches"], t_BL, modality_BL)
      x_BLD = jnp.where(is_image_BL1, image_BLD.astype(self.dtype), text_BLD)
    x_BLD = mesh.constrain(x_BLD, _ACT)
    horizon_BL = attention.horizon(batch["image_ids"], modality_BL, self.image_attention)
    x_BLD, new_cache = self._run_blocks(x_BLD, positions_BL, segment_BL, horizon_BL, cache, read_only)
    h_BLD = self.final_norm(x_BLD)
    if self.patches is None:
      return h_BLD, jnp.zeros(batch["patches"].shape, jnp.float32), new_cache
    patch_out_BLP = jnp.where(is_image_BL1, self.patches.decode(h_BLD, ctx), 0.0)
    return h_BLD, patch_out_BLP, new_cache

  def logits(self, h_BLD):
    """The LM head on final-normed hidden states: [..., D] -> fp32 [..., V]."""
    if self.lm_head is None:
      logits = self.embed.attend(h_BLD)
    else:
      logits = self.lm_head(h_BLD)
    return logits.astype(jnp.float32)

  def __call__(self, batch, t_BL, *, cache=None, read_only=False):
    """(logits_BLV fp32, patch_out_BLP fp32 (0 off images), new_cache); batch fields per tfx/record.py."""
    h_BLD, patch_out_BLP, new_cache = self.features(batch, t_BL, cache=cache, read_only=read_only)
    logits_BLV = mesh.constrain(self.logits(h_BLD), ("act_batch", "act_len", "act_vocab"))
    return logits_BLV, patch_out_BLP, new_cache
