"""The AutoencoderKL network (diffusers' layout) in Flax NNX, NHWC.

One architecture serves both the VAE that tfx trains (vae.py) and pretrained
diffusers checkpoints (diffusers.py): conv_in -> down blocks of ResNet blocks
-> mid block (ResNet, self-attention, ResNet) -> GroupNorm/SiLU/conv_out, and
the mirror image for the decoder. Parameter names follow diffusers so that a
state dict maps onto it by renaming only.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tfx import mesh

_KERNEL_NAMES = ("conv_kernel", "conv_kernel", "conv_in", "conv_out")
_DENSE_NAMES = ("conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class NetConfig:
  """The architecture fields of a diffusers AutoencoderKL config.json."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (32, 64)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 8
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def _conv(c_in: int, c_out: int, k: int, rngs: nnx.Rngs, stride: int = 1, padding="SAME") -> nnx.Conv:
  return nnx.Conv(c_in, c_out, (k, k), strides=(stride, stride), padding=padding, rngs=rngs,
                  kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), _KERNEL_NAMES),
                  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))


def _dense(c_in: int, c_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(c_in, c_out, rngs=rngs,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), _DENSE_NAMES),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm over NHWC: statistics per (sample, group), two-pass variance."""

  def __init__(self, channels: int, groups: int, eps: float = 1e-6):
    if channels % groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(jnp.ones((channels,)), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((channels,)), out_sharding=("norm",))

  def __call__(self, x_BHWC):
    b, h, w, c = x_BHWC.shape
    x = x_BHWC.reshape(b, h * w, self.groups, c // self.groups).astype(jnp.float32)
    mean = x.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(x - mean).mean(axis=(1, 3), keepdims=True)
    x = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return x * self.scale[...] + self.bias[...]


class ResnetBlock(nnx.Module):
  """diffusers ResnetBlock2D without a time embedding."""

  def __init__(self, c_in: int, c_out: int, groups: int, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(c_in, groups)
    self.conv1 = _conv(c_in, c_out, 3, rngs)
    self.norm2 = GroupNorm(c_out, groups)
    self.conv2 = _conv(c_out, c_out, 3, rngs)
    self.conv_shortcut = _conv(c_in, c_out, 1, rngs) if c_in != c_out else None

  def __call__(self, x_BHWC):
    h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = self.conv_shortcut(x_BHWC) if self.conv_shortcut is not None else x_BHWC
    return skip + h


class SpatialAttention(nnx.Module):
  """Self-attention over all H*W positions with a residual (diffusers' mid-block Attention)."""

  def __init__(self, channels: int, head_dim: int, groups: int, rngs: nnx.Rngs):
    self.heads = max(channels // head_dim, 1)
    self.group_norm = GroupNorm(channels, groups)
    self.to_q = _dense(channels, channels, rngs)
    self.to_k = _dense(channels, channels, rngs)
    self.to_v = _dense(channels, channels, rngs)
    self.to_out = _dense(channels, channels, rngs)

  def __call__(self, x_BHWC):
    b, h, w, c = x_BHWC.shape
    x_BLC = self.group_norm(x_BHWC).reshape(b, h * w, c)
    split = lambda t: t.reshape(b, h * w, self.heads, c // self.heads)
    q_BLHK, k_BLHK, v_BLHK = split(self.to_q(x_BLC)), split(self.to_k(x_BLC)), split(self.to_v(x_BLC))
    scores_BHLL = jnp.einsum("blhk,bmhk->bhlm", q_BLHK, k_BLHK) / math.sqrt(c // self.heads)
    probs_BHLL = jax.nn.softmax(scores_BHLL.astype(jnp.float32), axis=-1)
    out_BLC = jnp.einsum("bhlm,bmhk->blhk", probs_BHLL, v_BLHK).reshape(b, h * w, c)
    return x_BHWC + self.to_out(out_BLC).reshape(b, h, w, c)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (diffusers padding=0)."""

  def __init__(self, channels: int, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, rngs, stride=2, padding="VALID")

  def __call__(self, x_BHWC):
    return self.conv(jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""

  def __init__(self, channels: int, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, rngs)

  def __call__(self, x_BHWC):
    return self.conv(jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2))


class MidBlock(nnx.Module):
  def __init__(self, channels: int, groups: int, attention: bool, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs) for _ in range(2)])
    self.attention = SpatialAttention(channels, channels, groups, rngs) if attention else None

  def __call__(self, x_BHWC):
    x_BHWC = self.resnets[0](x_BHWC)
    if self.attention is not None:
      x_BHWC = self.attention(x_BHWC)
    return self.resnets[1](x_BHWC)


class Stage(nnx.Module):
  """A down (encoder) or up (decoder) block: ResNet blocks, then an optional resampler."""

  def __init__(self, c_in: int, c_out: int, layers: int, groups: int, resample, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(c_in if i == 0 else c_out, c_out, groups, rngs)
                             for i in range(layers)])
    self.resample = resample(c_out, rngs) if resample else None

  def __call__(self, x_BHWC):
    for block in self.resnets:
      x_BHWC = block(x_BHWC)
    return self.resample(x_BHWC) if self.resample is not None else x_BHWC


class Encoder(nnx.Module):
  """Image [B,H,W,in] -> moments [B,H/f,W/f,2*latent]."""

  def __init__(self, cfg: NetConfig, rngs: nnx.Rngs):
    chans, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = _conv(cfg.in_channels, chans[0], 3, rngs)
    self.down_blocks = nnx.List([
        Stage(chans[max(i - 1, 0)], c, cfg.layers_per_block, g,
              Downsample if i < len(chans) - 1 else None, rngs)
        for i, c in enumerate(chans)])
    self.mid_block = MidBlock(chans[-1], g, cfg.mid_block_add_attention, rngs)
    self.conv_norm_out = GroupNorm(chans[-1], g)
    self.conv_out = _conv(chans[-1], 2 * cfg.latent_channels, 3, rngs)

  def __call__(self, x_BHWC):
    x_BHWC = self.conv_in(x_BHWC)
    for block in self.down_blocks:
      x_BHWC = block(x_BHWC)
    x_BHWC = self.mid_block(x_BHWC)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x_BHWC)))


class Decoder(nnx.Module):
  """Latents [B,h,w,latent] -> image [B,h*f,w*f,out]."""

  def __init__(self, cfg: NetConfig, rngs: nnx.Rngs):
    chans, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    self.conv_in = _conv(cfg.latent_channels, chans[0], 3, rngs)
    self.mid_block = MidBlock(chans[0], g, cfg.mid_block_add_attention, rngs)
    self.up_blocks = nnx.List([
        Stage(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, g,
              Upsample if i < len(chans) - 1 else None, rngs)
        for i, c in enumerate(chans)])
    self.conv_norm_out = GroupNorm(chans[-1], g)
    self.conv_out = _conv(chans[-1], cfg.out_channels, 3, rngs)

  def __call__(self, z_BhwC):
    x_BHWC = self.mid_block(self.conv_in(z_BhwC))
    for block in self.up_blocks:
      x_BHWC = block(x_BHWC)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x_BHWC)))


class AutoencoderKL(nnx.Module):
  """Encoder + Decoder with diffusers' optional 1x1 quant/post-quant convs."""

  def __init__(self, cfg: NetConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs)
    self.decoder = Decoder(cfg, rngs)
    lc = cfg.latent_channels
    self.quant_conv = _conv(2 * lc, 2 * lc, 1, rngs) if cfg.use_quant_conv else None
    self.post_quant_conv = _conv(lc, lc, 1, rngs) if cfg.use_post_quant_conv else None

  def moments(self, images_BHWC):
    """(mean, logvar) of the latent posterior, each [B,h,w,latent]."""
    images_BHWC = mesh.constrain(images_BHWC, ("act_batch", None, None, None))
    m = self.encoder(images_BHWC)
    if self.quant_conv is not None:
      m = self.quant_conv(m)
    mean, logvar = jnp.split(m, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z_BhwC):
    z_BhwC = mesh.constrain(z_BhwC, ("act_batch", None, None, None))
    if self.post_quant_conv is not None:
      z_BhwC = self.post_quant_conv(z_BhwC)
    return self.decoder(z_BhwC)


def abstract_autoencoder(cfg: NetConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of an AutoencoderKL; allocates nothing. Built without eager
  sharding, so loading works inside a training mesh (whose axes are not the logical names)."""
  graphdefs = []

  def build_state():
    with nnx.use_eager_sharding(False):
      graphdef, state = nnx.split(AutoencoderKL(cfg, nnx.Rngs(0)))
    graphdefs.append(graphdef)  # static: safe to take out of the trace
    return state

  state = jax.eval_shape(build_state)
  return graphdefs[0], state
