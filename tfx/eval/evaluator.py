"""Evaluation during training, built once per run (big_vision style).

The trainer makes one `Evaluator(config)` and calls `.run(model)` every
eval_every_steps and `.sample_grid(model)` every sample_every_steps. Prompts,
held-out text and the compiled generator are made on first use and kept.
"""
import contextlib

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tfx import generate, mesh as mesh_lib
from tfx.eval import eval_set, perplexity, suite

QUICK_PAIRS = 12          # 4 prompts per caption kind, captioned back too
QUICK_TEXT_RECORDS = 8


def _addressable_copy(model):
  """(model, mesh context) this process can generate with on its own.

  A model whose arrays span several processes is gathered into a copy on this
  process's first device and run under a one-device mesh: every process computes
  the same results with no collective, so none waits on another's generation.
  """
  if all(x.is_fully_addressable for x in jax.tree.leaves(nnx.state(model))):
    return model, contextlib.nullcontext()
  graphdef, state = nnx.split(model)
  state = multihost_utils.process_allgather(state, tiled=True)  # every process calls this: a collective
  device = jax.local_devices()[0]
  mesh = jax.sharding.Mesh(np.array([device]).reshape(1, 1, 1), mesh_lib.MESH_AXES)
  return nnx.merge(graphdef, jax.device_put(state, device)), jax.set_mesh(mesh)


class Evaluator:
  """Quick metrics and sample grids of a model during training; one per run."""

  def __init__(self, config):
    self.config = config
    self._pairs = None
    self._text_records = None
    self._generator = None
    self._nll_fn = None

  def _generator_for(self, model) -> generate.Generator:
    """The Generator, compiled once; later calls only swap in `model`'s params."""
    if self._generator is None or self._generator.graphdef != nnx.graphdef(model):
      self._generator = generate.Generator(self.config, model)
      self._nll_fn = perplexity.make_nll_fn(self._generator.graphdef)
    else:
      self._generator.load_params(model)
    return self._generator

  def run(self, model) -> dict[str, float]:
    """A fast subset of tfx.eval.suite: `eval_`-prefixed float scalars.

    Text-to-image pass rates on 12 test prompts (4 per kind) at the config's sampler
    settings, exact-match captions of their ground-truth images, held-out text perplexity.
    """
    if self._pairs is None:
      self._pairs = eval_set.load_pairs(self.config, "test", QUICK_PAIRS)
      self._text_records = eval_set.text_records(self.config, QUICK_TEXT_RECORDS)
    pairs = self._pairs
    model, mesh = _addressable_copy(model)
    with mesh:
      gen = self._generator_for(model)
      metrics = {}
      if pairs.has_kinds:
        images = suite.generate_images(gen, pairs.captions, batch_size=QUICK_PAIRS, seed=0, cfg_scale=None,
                                       steps=None, sampler=None)
        t2i = suite.text_to_image_scores(pairs, images)
        metrics.update({k: t2i[k] for k in ("t2i_pass", "t2i_pass_single", "t2i_pass_count",
                                            "t2i_pass_relation")})
      captions = suite.generate_captions(gen, pairs.images, batch_size=QUICK_PAIRS, max_tokens=24, seed=0)
      metrics.update({k: v for k, v in suite.caption_scores(pairs, captions).items() if k != "caption_num"})
      if self._text_records:
        batches = eval_set.batches(self._text_records, QUICK_TEXT_RECORDS)
        metrics["ppl_text"], _ = perplexity.perplexity(model, batches, self._nll_fn)
    return {f"eval_{k}": float(v) for k, v in metrics.items()}

  def sample_grid(self, model, *, samples_per_prompt: int = 4) -> np.ndarray:
    """uint8 grid: one row per config.sample_prompts, `samples_per_prompt` images each (seed 0)."""
    prompts = [p for p in self.config.sample_prompts for _ in range(samples_per_prompt)]
    model, mesh = _addressable_copy(model)
    with mesh:
      images = self._generator_for(model).text_to_image(prompts, seed=0, batch_size=len(prompts))
    return generate.image_grid(images, cols=samples_per_prompt)
