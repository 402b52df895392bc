"""Reading images a user names, with bounds: regular files only, a byte cap, a pixel cap.

Every loader of user images (tfx.generate.load_image, tfx.data.prepare) reads through
here, so a path such as /dev/zero or a decompression bomb fails in one line instead of
filling the host's memory.
"""
import io
import os
import stat

import numpy as np

from tfx import fs

MAX_IMAGE_BYTES = 64 << 20   # image files larger than this are refused (4096x4096 RGB is 48 MiB raw)
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS, enforced as an error, not a warning


class ImageReadError(ValueError):
  """A path that is not a readable image file."""


class ImageTooLargeError(ImageReadError):
  """An image over MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS."""


def read_bytes(path, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
  """The file's bytes; a local path must be a regular file. Raises ImageReadError in one line."""
  path = str(path)
  if fs.is_local(path):
    try:
      st = os.stat(path)
    except OSError as e:
      raise ImageReadError(f"cannot read image {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
      raise ImageReadError(f"cannot read image {path}: not a regular file")
    if st.st_size > max_bytes:
      raise ImageTooLargeError(f"image {path} is {st.st_size} bytes, over the {max_bytes}-byte limit")
  try:
    with fs.open(path, "rb") as f:
      data = f.read(max_bytes + 1)  # bounded even if the file grows or its size was not known
  except OSError as e:
    raise ImageReadError(f"cannot read image {path}: {e.strerror or e}") from None
  if len(data) > max_bytes:
    raise ImageTooLargeError(f"image {path} is over the {max_bytes}-byte limit")
  return data


def decode_rgb(data: bytes, name: str = "image", max_pixels: int = MAX_IMAGE_PIXELS):
  """Encoded bytes -> an RGB PIL image; the size is checked from the header before decoding."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
      if w * h > max_pixels:
        raise ImageTooLargeError(f"{name} is {w}x{h} pixels, over the {max_pixels}-pixel limit")
      im.load()
      return im.convert("RGB")
  except ImageReadError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageTooLargeError(f"{name}: {e}") from None
  except Exception as e:  # PIL raises many types for corrupt data
    raise ImageReadError(f"cannot read {name}: {e}") from None


def load_rgb(path) -> np.ndarray:
  """uint8 [H, W, 3] from an image file, within both caps; raises ImageReadError in one line."""
  return np.asarray(decode_rgb(read_bytes(path), f"image {path}"), np.uint8)
