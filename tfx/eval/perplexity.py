"""Perplexity of the language-model head on held-out records (text, or captions).

exp(mean next-token negative log-likelihood) over the positions each record's
`lm_mask` marks. Images in the records are clean (t = 0), so a caption that
follows its image is scored given that image.
"""
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfx import losses

MODEL_FIELDS = ("tokens", "patches", "modality", "segment_ids", "positions", "image_ids")


def token_nll_sum(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of masked next-token NLL, number of masked tokens)."""
  nll_BL = -losses.token_log_probs(logits_BLV, targets_BL)
  mask_BL = mask_BL.astype(jnp.float32)
  return (nll_BL * mask_BL).sum(), mask_BL.sum()


def make_nll_fn(graphdef):
  """A jitted (params, batch) -> (nll sum, token count) for a split model."""

  @jax.jit
  def nll(params, batch):
    model = nnx.merge(graphdef, params)
    inputs = {k: batch[k] for k in MODEL_FIELDS}
    t_BL = jnp.zeros(batch["tokens"].shape, jnp.float32)
    logits_BLV, _, _ = model(inputs, t_BL)
    return token_nll_sum(logits_BLV, batch["lm_targets"], batch["lm_mask"])

  return nll


def perplexity(model: nnx.Module, batches: Iterable[dict], nll_fn=None) -> tuple[float, int]:
  """(perplexity, tokens scored) of `model` over record batches."""
  graphdef, params = nnx.split(model)
  nll_fn = nll_fn or make_nll_fn(graphdef)
  total, count = 0.0, 0.0
  for batch in batches:
    s, n = nll_fn(params, {k: jnp.asarray(v) for k, v in batch.items()})
    total += float(s)
    count += float(n)
  if count == 0:
    raise ValueError("perplexity: the batches hold no text tokens to score")
  return float(np.exp(total / count)), int(count)
