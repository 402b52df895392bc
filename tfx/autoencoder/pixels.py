"""The identity autoencoder: latents are the pixels themselves (for ablations and the CPU default)."""
import jax.numpy as jnp

from tfx.autoencoder.base import Autoencoder


class PixelAutoencoder(Autoencoder):
  """encode/decode are the identity on [B,H,W,3] images in [-1, 1]."""

  def __init__(self, scaling_factor: float = 1.0, shift_factor: float = 0.0):
    self.downsample, self.latent_channels = 1, 3
    self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)

  def encode(self, images_BHWC):
    self._check_images(images_BHWC)
    return jnp.asarray(images_BHWC, jnp.float32)

  def decode(self, latents_BhwC):
    self._check_latents(latents_BhwC)
    return jnp.asarray(latents_BhwC, jnp.float32)
