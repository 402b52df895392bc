"""Reconstruction quality of an autoencoder on captioned shapes images: PSNR and scorer pass rates."""
import numpy as np

from tfx.autoencoder.base import Autoencoder
from tfx.data import shapes


def to_unit(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float in [-1, 1] -> uint8 (clipped, rounded)."""
  return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def batched(fn, x_N: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """fn over x in fixed-size batches (the last one padded), so a jitted fn compiles once."""
  out = []
  for i in range(0, len(x_N), batch_size):
    chunk = x_N[i:i + batch_size]
    pad = batch_size - len(chunk)
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
    out.append(np.asarray(fn(padded))[:len(chunk)])
  return np.concatenate(out)


def reconstruct(ae: Autoencoder, images_uint8: np.ndarray) -> np.ndarray:
  """encode -> decode of uint8 images [N,H,W,3], returned as uint8."""
  return to_uint8(batched(lambda x: ae.decode(ae.encode(x)), to_unit(images_uint8)))


def psnr_db(a_uint8: np.ndarray, b_uint8: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB of two uint8 batches (peak 255)."""
  mse = np.square(a_uint8.astype(np.float64) - b_uint8.astype(np.float64)).mean(axis=(1, 2, 3))
  return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def evaluate(ae: Autoencoder, images_uint8: np.ndarray, captions: list[str], *, score: bool = True) -> dict:
  """Mean PSNR of reconstructions and (if `score`) the shapes scorer's pass rates, originals vs recons."""
  recon = reconstruct(ae, images_uint8)
  out = dict(psnr_db=float(psnr_db(images_uint8, recon).mean()), images=len(images_uint8))
  if not score:
    return out
  passed_orig = np.array([shapes.score(im, c)["passed"] for im, c in zip(images_uint8, captions)])
  passed_recon = np.array([shapes.score(im, c)["passed"] for im, c in zip(recon, captions)])
  rate_orig, rate_recon = float(passed_orig.mean()), float(passed_recon.mean())
  return out | dict(scorer_rate_original=rate_orig, scorer_rate_reconstructed=rate_recon,
                    scorer_ratio=rate_recon / rate_orig if rate_orig else 0.0)
