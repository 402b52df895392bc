"""Images in and out of generation: files -> uint8 arrays, model range -> uint8, a grid of samples."""
import math

import numpy as np

from tfx import image_io


ImageReadError = image_io.ImageReadError  # a path that is not a readable image within the caps


def load_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] from a regular image file within image_io's byte and pixel caps;
  raises ImageReadError in one line."""
  return image_io.load_rgb(path)


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] -> uint8 (clipped)."""
  return np.asarray(np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255), np.uint8)


def image_grid(images_NHW3: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles N images into one uint8 grid with white gutters."""
  n, h, w, c = images_NHW3.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images_NHW3):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
  return grid
