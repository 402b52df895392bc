"""The autoencoder interface: images in [-1, 1] <-> latent grids, plus the latent scaling."""
import abc
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tfx.autoencoder import nets


class AutoencoderError(ValueError):
  """An autoencoder that cannot be loaded or does not fit the config."""


class Autoencoder(abc.ABC):
  """images [B,H,W,3] in [-1,1] <-> raw latents [B,H/f,W/f,c].

  Diffusion runs on `to_diffusion(latents) = (latents - shift_factor) * scaling_factor`.
  """
  downsample: int = 1
  latent_channels: int = 3
  scaling_factor: float = 1.0
  shift_factor: float = 0.0

  @abc.abstractmethod
  def encode(self, images_BHWC):
    """images [B,H,W,3] in [-1,1] -> raw latents [B,H/f,W/f,c] (deterministic)."""

  @abc.abstractmethod
  def decode(self, latents_BhwC):
    """raw latents [B,h,w,c] -> images [B,h*f,w*f,3], roughly in [-1,1]."""

  def to_diffusion(self, latents_BhwC):
    """Raw latents -> the scaled latents the transformer diffuses."""
    return (latents_BhwC - self.shift_factor) * self.scaling_factor

  def from_diffusion(self, z_BhwC):
    """Scaled latents (e.g. generated) -> raw latents for `decode`."""
    return z_BhwC / self.scaling_factor + self.shift_factor

  def latent_side(self, image_side: int) -> int:
    if image_side % self.downsample:
      raise AutoencoderError(f"image side {image_side} is not divisible by the autoencoder's "
                             f"downsampling factor {self.downsample}")
    return image_side // self.downsample

  def _check_images(self, images_BHWC) -> None:
    if images_BHWC.ndim != 4 or images_BHWC.shape[-1] != 3:
      raise AutoencoderError(f"encode expects images [B, H, W, 3], got shape {tuple(images_BHWC.shape)}")
    self.latent_side(images_BHWC.shape[1]), self.latent_side(images_BHWC.shape[2])

  def _check_latents(self, latents_BhwC) -> None:
    if latents_BhwC.ndim != 4 or latents_BhwC.shape[-1] != self.latent_channels:
      raise AutoencoderError(f"decode expects latents [B, h, w, {self.latent_channels}], "
                             f"got shape {tuple(latents_BhwC.shape)}")


@functools.lru_cache(maxsize=16)
def _jitted(graphdef):
  """Jitted (encode, decode) of one architecture, shared by every instance (compiled once)."""
  encode = jax.jit(lambda params, x: nnx.merge(graphdef, params).moments(x)[0])
  decode = jax.jit(lambda params, z: nnx.merge(graphdef, params).decode(z))
  return encode, decode


class NetAutoencoder(Autoencoder):
  """An Autoencoder backed by an nets.AutoencoderKL; encode returns the posterior mean."""

  def __init__(self, net: nets.AutoencoderKL, scaling_factor: float, shift_factor: float):
    self.net_config = net.cfg
    self.downsample = net.cfg.downsample
    self.latent_channels = net.cfg.latent_channels
    self.scaling_factor = float(scaling_factor)
    self.shift_factor = float(shift_factor)
    self.graphdef, self.params = nnx.split(net)
    self._encode, self._decode = _jitted(self.graphdef)

  @property
  def net(self) -> nets.AutoencoderKL:
    return nnx.merge(self.graphdef, self.params)

  def encode(self, images_BHWC):
    self._check_images(images_BHWC)
    return self._encode(self.params, jnp.asarray(images_BHWC, jnp.float32))

  def decode(self, latents_BhwC):
    self._check_latents(latents_BhwC)
    return self._decode(self.params, jnp.asarray(latents_BhwC, jnp.float32))
