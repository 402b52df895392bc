"""Cutting image (or latent) grids into k x k patches, raster order, and back.

Works on numpy or jax arrays. A grid [..., H, W, C] becomes [..., (H/k)*(W/k), k*k*C];
inside a patch the layout is (row, col, channel).
"""
import math


def num_patches(side: int, k: int) -> int:
  """Patches per image for a square grid of `side` cells."""
  if side % k:
    raise ValueError(f"grid side {side} is not divisible by patch size {k}")
  return (side // k) ** 2


def patch_dim(k: int, channels: int) -> int:
  return k * k * channels


def patchify(grid, k: int):
  """[..., H, W, C] -> [..., H/k * W/k, k*k*C]."""
  *lead, h, w, c = grid.shape
  if h % k or w % k:
    raise ValueError(f"grid {h}x{w} is not divisible by patch size {k}")
  x = grid.reshape(*lead, h // k, k, w // k, k, c)
  nd = len(lead)
  x = x.transpose(*range(nd), nd, nd + 2, nd + 1, nd + 3, nd + 4)
  return x.reshape(*lead, (h // k) * (w // k), k * k * c)


def unpatchify(patches, k: int, channels: int):
  """[..., n, k*k*C] -> [..., H, W, C] for a square grid of n patches."""
  *lead, n, _ = patches.shape
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"{n} patches do not form a square grid")
  x = patches.reshape(*lead, side, side, k, k, channels)
  nd = len(lead)
  x = x.transpose(*range(nd), nd, nd + 2, nd + 1, nd + 3, nd + 4)
  return x.reshape(*lead, side * k, side * k, channels)
