"""Modality layers between image latents and the transformer: linear patches or U-Net blocks.

Both expose `encode(patches_BLP, t_BL, modality_BL) -> (x_BLD, ctx)` (a d_model
vector per position; only image positions are used) and
`decode(x_BLD, ctx) -> out_BLP` (the image head's prediction per position).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfx import mesh, patching, record
from tfx.model import layers


def timestep_features(t, dim: int):
  """Sinusoidal features of a (float) diffusion timestep: [...] -> [..., dim]."""
  half = dim // 2
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angle = t.astype(jnp.float32)[..., None] * freq
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class TimestepEmbed(nnx.Module):
  """Sinusoidal features -> MLP -> `out_dim`."""

  def __init__(self, feature_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.feature_dim = feature_dim
    self.fc1 = layers.Dense((feature_dim,), (out_dim,), ("t_embed", "embed"), rngs=rngs, dtype=dtype,
                            use_bias=True)
    self.fc2 = layers.Dense((out_dim,), (out_dim,), ("embed", "embed"), rngs=rngs, dtype=dtype,
                            use_bias=True)

  def __call__(self, t):
    # t comes from the loss unsharded; without pinning the batch dim, FSDP runs this MLP on the
    # global batch (16 GiB per device at 7B on 64 devices, measured with tfx.dryrun).
    batch = lambda x: mesh.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))
    h = batch(jax.nn.silu(self.fc1(batch(timestep_features(t, self.feature_dim)))))
    return batch(self.fc2(h))


class LinearPatches(nnx.Module):
  """Paper's linear encoder: patch -> d_model plus a timestep embedding (and, with
  `grid_side`, a fixed 2-D position embedding of the patch in its image); d_model -> patch."""

  def __init__(self, patch_dim: int, d_model: int, t_embed_dim: int, *, grid_side: int = 0,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.grid_side = grid_side
    self.proj_in = layers.Dense((patch_dim,), (d_model,), ("patch", "embed"), rngs=rngs, dtype=dtype,
                                use_bias=True)
    self.t_embed = TimestepEmbed(t_embed_dim, d_model, rngs=rngs, dtype=dtype)
    self.proj_out = layers.Dense((d_model,), (patch_dim,), ("embed", "patch"), rngs=rngs, dtype=dtype,
                                 use_bias=True)

  def encode(self, patches_BLP, t_BL, modality_BL):
    x_BLD = self.proj_in(patches_BLP) + self.t_embed(t_BL)
    return add_grid_embedding(x_BLD, modality_BL, self.grid_side), None

  def decode(self, x_BLD, ctx):
    return self.proj_out(x_BLD).astype(jnp.float32)


# ---- U-Net ------------------------------------------------------------------


class Conv(nnx.Module):
  """2-D convolution, NHWC, 'SAME' padding."""

  def __init__(self, c_in: int, c_out: int, size: int, *, stride: int = 1, rngs: nnx.Rngs,
               dtype=jnp.float32, in_name: str = "conv_in", out_name: str = "conv_out"):
    init = nnx.initializers.normal((size * size * c_in) ** -0.5)
    self.kernel = layers.param(rngs, init, (size, size, c_in, c_out),
                               ("conv_kernel", "conv_kernel", in_name, out_name))
    self.bias = layers.param(rngs, nnx.initializers.zeros, (c_out,), (out_name,))
    self.stride = stride
    self.dtype = dtype

  def __call__(self, x_NHWC):
    y = jax.lax.conv_general_dilated(
        x_NHWC.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride,) * 2, "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype)


class ResBlock(nnx.Module):
  """LayerNorm -> SiLU -> conv, twice, with the timestep embedding added in between."""

  def __init__(self, c_in: int, c_out: int, t_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.norm1 = layers.LayerNorm(c_in, rngs=rngs)
    self.conv1 = Conv(c_in, c_out, 3, rngs=rngs, dtype=dtype)
    self.t_proj = layers.Dense((t_dim,), (c_out,), ("embed", "conv_out"), rngs=rngs, dtype=dtype,
                               use_bias=True)
    self.norm2 = layers.LayerNorm(c_out, rngs=rngs)
    self.conv2 = Conv(c_out, c_out, 3, rngs=rngs, dtype=dtype)
    self.skip = Conv(c_in, c_out, 1, rngs=rngs, dtype=dtype) if c_in != c_out else None

  def __call__(self, x_NHWC, temb_NT):
    h = self.conv1(jax.nn.silu(self.norm1(x_NHWC)))
    h = h + self.t_proj(temb_NT)[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return h + (x_NHWC if self.skip is None else self.skip(x_NHWC))


def _upsample2(x_NHWC):
  return jnp.repeat(jnp.repeat(x_NHWC, 2, axis=1), 2, axis=2)


def space_to_depth(x_NHWC, s: int):
  """[N, H, W, C] -> [N, H/s, W/s, s*s*C]: each s x s block of cells becomes one cell's channels."""
  return patching.patchify(x_NHWC, s).reshape(x_NHWC.shape[0], x_NHWC.shape[1] // s, x_NHWC.shape[2] // s, -1)


def depth_to_space(x_NHWC, s: int, channels: int):
  """The inverse of `space_to_depth`: [N, h, w, s*s*C] -> [N, h*s, w*s, C]."""
  N, h, w, _ = x_NHWC.shape
  return patching.unpatchify(x_NHWC.reshape(N, h * w, -1), s, channels)


def image_offsets(modality_BL, n: int):
  """Each position's index in its image (0..n-1; meaningless off images). An image is n
  consecutive image positions; a run of them may hold several images (BOI/EOI separate runs)."""
  B, L = modality_BL.shape
  is_image_BL = modality_BL == record.IMAGE
  prev_image_BL = jnp.concatenate([jnp.zeros((B, 1), bool), is_image_BL[:, :-1]], axis=1)
  run_start_BL = is_image_BL & ~prev_image_BL
  run_origin_BL = jax.lax.cummax(jnp.where(run_start_BL, jnp.arange(L), 0), axis=1)
  return (jnp.arange(L) - run_origin_BL) % n


def sincos_2d(side: int, dim: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding [side * side, dim] of a row-major patch grid
  (MAE/DiT): half the channels encode the row, half the column."""
  if dim % 4:
    raise ValueError(f"model.image_pos_embed='sincos2d' needs model.d_model divisible by 4, got {dim}")
  freq = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  angle_row = np.repeat(np.arange(side), side)[:, None] * freq
  angle_col = np.tile(np.arange(side), side)[:, None] * freq
  table = np.concatenate([np.sin(angle_row), np.cos(angle_row), np.sin(angle_col), np.cos(angle_col)], 1)
  return table.astype(np.float32)


def add_grid_embedding(x_BLD, modality_BL, grid_side: int):
  """x plus the fixed `sincos_2d` embedding of each image position's (row, column); a no-op
  for grid_side 0. RoPE gives patches only their 1-D order in the sequence."""
  if not grid_side:
    return x_BLD
  table_ND = jnp.asarray(sincos_2d(grid_side, x_BLD.shape[-1]), x_BLD.dtype)
  return x_BLD + table_ND[image_offsets(modality_BL, grid_side ** 2)]


def image_slots(modality_BL, n: int, max_images: int):
  """Start index of each image in order (slot), whether the slot is used, each position's
  (slot, offset in its image), with images as in `image_offsets`, and where an image position
  lies past the last slot (an image the bound leaves out)."""
  B, L = modality_BL.shape
  is_image_BL = modality_BL == record.IMAGE
  offset_BL = image_offsets(modality_BL, n)
  starts_flag_BL = is_image_BL & (offset_BL == 0)
  slot_BL = jnp.cumsum(starts_flag_BL.astype(jnp.int32), axis=1) - 1
  onehot_BML = starts_flag_BL[:, None, :] & (slot_BL[:, None, :] == jnp.arange(max_images)[None, :, None])
  present_BM = onehot_BML.any(-1)
  starts_BM = jnp.argmax(onehot_BML, axis=-1)
  overflow_BL = is_image_BL & (slot_BL >= max_images)
  return starts_BM, present_BM, jnp.clip(slot_BL, 0, max_images - 1), offset_BL, overflow_BL


class UNetPatches(nnx.Module):
  """U-Net down blocks to one d_model vector per patch cell, and the mirrored up blocks after.

  Each image's n contiguous patches are regrouped into its latent grid [s*k, s*k, c]; log2(k)
  stride-2 levels bring it to [s, s, d_model], so any power-of-two patch size k works. With
  `space_to_depth` f > 1 the grid first folds each f x f block of cells into channels
  ([s*k/f, s*k/f, f*f*c], pixel-unshuffle) and log2(k/f) levels follow: the full-resolution
  level, the U-Net's dearest on a CPU for its few channels, is not run (unfolded again at the end).
  The U-Net runs on M = min(image.max_images_per_seq, L // n) image slots per row, used or
  not: the packer (tfx/data/packing.py) never puts more images in a record, and
  experiments/transfusion.py sets that cap from the data mix, not from L // n. An image past
  the M-th would have no slot: its positions become NaN (the loss, then the trainer's finite
  check, fails loudly) instead of silently reusing another image's output. The timestep of an
  image is read at its first patch.
  """

  def __init__(self, *, patch_size: int, channels: int, grid_side: int, d_model: int,
               widths, blocks_per_level: int, t_embed_dim: int, max_images: int,
               pos_embed: bool = False, space_to_depth: int = 1, rngs: nnx.Rngs, dtype=jnp.float32):
    n_down = int(round(math.log2(patch_size)))
    if 2 ** n_down != patch_size:
      raise ValueError(f"model.encoder='unet' needs a power-of-two image.patch_size, got {patch_size}")
    folds = int(round(math.log2(space_to_depth))) if space_to_depth >= 1 else -1
    if folds < 0 or 2 ** folds != space_to_depth or folds > n_down:
      raise ValueError(f"model.unet_space_to_depth must be a power of two from 1 to image.patch_size "
                       f"({patch_size}), got {space_to_depth}")
    n_down -= folds
    widths = tuple(widths)
    width = lambda level: widths[min(level, len(widths) - 1)]
    self.k, self.c, self.side, self.n_down = patch_size, channels, grid_side, n_down
    self.fold = space_to_depth
    self.max_images = max_images
    self.pos_embed = pos_embed
    t_dim = width(n_down) * 4
    self.t_embed = TimestepEmbed(t_embed_dim, t_dim, rngs=rngs, dtype=dtype)
    # latent channels (3, 4, 8...) do not split over "fsdp"/"tensor": named like the patch vector
    self.conv_in = Conv(channels * space_to_depth ** 2, width(0), 3, rngs=rngs, dtype=dtype, in_name="patch")
    self.down_blocks = nnx.List([nnx.List([ResBlock(width(l), width(l), t_dim, rngs=rngs, dtype=dtype)
                                           for _ in range(blocks_per_level)]) for l in range(n_down)])
    self.downsamples = nnx.List([Conv(width(l), width(l + 1), 3, stride=2, rngs=rngs, dtype=dtype)
                                 for l in range(n_down)])
    self.mid_down = ResBlock(width(n_down), width(n_down), t_dim, rngs=rngs, dtype=dtype)
    self.norm_in = layers.LayerNorm(width(n_down), rngs=rngs)
    self.to_model = layers.Dense((width(n_down),), (d_model,), ("conv_in", "embed"), rngs=rngs,
                                 dtype=dtype, use_bias=True)
    self.from_model = layers.Dense((d_model,), (width(n_down),), ("embed", "conv_out"), rngs=rngs,
                                   dtype=dtype, use_bias=True)
    self.mid_up = ResBlock(width(n_down), width(n_down), t_dim, rngs=rngs, dtype=dtype)
    self.upsamples = nnx.List([Conv(width(l + 1), width(l), 3, rngs=rngs, dtype=dtype)
                               for l in range(n_down)])
    self.up_blocks = nnx.List([nnx.List([ResBlock(width(l) * (2 if b == 0 else 1), width(l), t_dim,
                                                  rngs=rngs, dtype=dtype)
                                         for b in range(blocks_per_level)]) for l in range(n_down)])
    self.norm_out = layers.LayerNorm(width(0), rngs=rngs)
    self.conv_out = Conv(width(0), channels * space_to_depth ** 2, 3, rngs=rngs, dtype=dtype, out_name="patch")

  def encode(self, patches_BLP, t_BL, modality_BL):
    B, L, P = patches_BLP.shape
    n = self.side * self.side
    M = max(1, min(self.max_images, L // n))
    starts_BM, present_BM, slot_BL, offset_BL, overflow_BL = image_slots(modality_BL, n, M)
    idx_BMN = jnp.clip(starts_BM[:, :, None] + jnp.arange(n), 0, L - 1)
    img_BMNP = jnp.take_along_axis(patches_BLP[:, None], idx_BMN[..., None], axis=2)
    grid_XHWC = patching.unpatchify(img_BMNP.reshape(B * M, n, P), self.k, self.c)
    t_X = jnp.take_along_axis(t_BL, starts_BM, axis=1).reshape(B * M)
    temb_XT = self.t_embed(t_X)
    h = self.conv_in(space_to_depth(grid_XHWC, self.fold))
    skips = []
    for level in range(self.n_down):
      for block in self.down_blocks[level]:
        h = block(h, temb_XT)
      skips.append(h)
      h = self.downsamples[level](h)
    h = self.mid_down(h, temb_XT)
    vec_XND = self.to_model(self.norm_in(h)).reshape(B * M, n, -1)
    vec_BMND = vec_XND.reshape(B, M, n, -1)
    x_BLD = vec_BMND[jnp.arange(B)[:, None], slot_BL, jnp.clip(offset_BL, 0, n - 1)]
    x_BLD = add_grid_embedding(x_BLD, modality_BL, self.side if self.pos_embed else 0)
    x_BLD = jnp.where(overflow_BL[..., None], jnp.nan, x_BLD)
    ctx = dict(skips=skips, temb=temb_XT, slot=slot_BL, offset=offset_BL, starts=starts_BM,
               present=present_BM)
    return x_BLD, ctx

  def decode(self, x_BLD, ctx):
    B, L, _ = x_BLD.shape
    M = ctx["starts"].shape[1]
    n = self.side * self.side
    idx_BMN = jnp.clip(ctx["starts"][:, :, None] + jnp.arange(n), 0, L - 1)
    vec_BMND = jnp.take_along_axis(x_BLD[:, None], idx_BMN[..., None], axis=2)
    h = self.from_model(vec_BMND.reshape(B * M, self.side, self.side, -1))
    temb_XT = ctx["temb"]
    h = self.mid_up(h, temb_XT)
    for level in reversed(range(self.n_down)):
      h = self.upsamples[level](_upsample2(h))
      h = jnp.concatenate([h, ctx["skips"][level].astype(h.dtype)], axis=-1)
      for block in self.up_blocks[level]:
        h = block(h, temb_XT)
    grid_XHWC = depth_to_space(self.conv_out(jax.nn.silu(self.norm_out(h))), self.fold, self.c)
    out_BMNP = patching.patchify(grid_XHWC, self.k).reshape(B, M, n, -1)
    out_BLP = out_BMNP[jnp.arange(B)[:, None], ctx["slot"], jnp.clip(ctx["offset"], 0, n - 1)]
    return out_BLP.astype(jnp.float32)


def build(config, *, rngs: nnx.Rngs, dtype=jnp.float32):
  """The modality layers chosen by config.model.encoder."""
  m, im, ae = config.model, config.image, config.autoencoder
  side = im.resolution // ae.downsample
  p_dim = patching.patch_dim(im.patch_size, ae.latent_channels)
  if m.image_pos_embed not in ("sincos2d", "none"):
    raise ValueError(f"model.image_pos_embed must be 'sincos2d' or 'none', got {m.image_pos_embed!r}")
  if m.encoder == "linear":
    grid_side = side // im.patch_size if m.image_pos_embed == "sincos2d" else 0
    return LinearPatches(p_dim, m.d_model, m.t_embed_dim, grid_side=grid_side, rngs=rngs, dtype=dtype)
  if m.encoder == "unet":
    patching.num_patches(side, im.patch_size)  # raises if the grid does not divide
    return UNetPatches(patch_size=im.patch_size, channels=ae.latent_channels,
                       grid_side=side // im.patch_size, d_model=m.d_model, widths=m.unet_channels,
                       blocks_per_level=m.unet_blocks_per_level, t_embed_dim=m.t_embed_dim,
                       max_images=im.max_images_per_seq, pos_embed=m.image_pos_embed == "sincos2d",
                       space_to_depth=m.unet_space_to_depth, rngs=rngs, dtype=dtype)
  raise ValueError(f"model.encoder must be 'linear' or 'unet', got {m.encoder!r}")
