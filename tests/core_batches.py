"""Random packed batches (tfx/record.py format) for the core tests: segments of text with 0-3 images."""
import jax
import numpy as np
from flax import nnx

from tfx.record import random_batch  # noqa: F401  (the tests' batches)


def reference_mask(segment_L: np.ndarray, image_ids_L: np.ndarray) -> np.ndarray:
  """The Transfusion mask by a plain loop: causal, bidirectional inside an image, per segment."""
  L = len(segment_L)
  horizon = list(range(L))
  for i in range(L):
    if image_ids_L[i]:
      j = i
      while j + 1 < L and image_ids_L[j + 1] == image_ids_L[i]:
        j += 1
      horizon[i] = j
  mask = np.zeros((L, L), bool)
  for i in range(L):
    for j in range(L):
      mask[i, j] = segment_L[i] != 0 and segment_L[i] == segment_L[j] and j <= horizon[i]
  return mask



def fast_rngs(seed: int = 0) -> nnx.Rngs:
  """Init keys on the "rbg" PRNG: its normal sampler compiles ~2.5x faster on CPU than threefry's,
  and eager init compiles one sampler per parameter shape."""
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))
