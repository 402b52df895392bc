"""The evaluation suite over a model: text-to-image, captioning, perplexity and Frechet distance.

`run(config, model, options)` returns flat float metrics with what was generated
(tfx.eval.evaluator.Evaluator runs a cheap subset during training). Rates are fractions in
[0, 1]; sweep entries (extra guidance scales / step counts) carry a
`@cfg{scale}_steps{n}` suffix, the first combination none.
"""
import dataclasses
import time
from typing import Callable

import numpy as np

from tfx import distributed, fs
from tfx.eval import captioning, eval_set, fd, perplexity, shapesnet, t2i

SHAPESNET_STEPS = 1200
SHAPESNET_IMAGES = 20000
SHAPESNET_SEED = 4321


@dataclasses.dataclass
class Options:
  split: str = "test"
  num: int = 96                     # pairs of `split` (an equal share per caption kind)
  num_heldout: int = 48             # pairs of the held-out colour-shape combinations
  cfg_scales: tuple = (None,)       # None = config.diffusion.cfg_scale
  steps: tuple = (None,)            # None = config.diffusion.sample_steps
  sampler: str | None = None        # None = config.diffusion.sampler
  cfg_interval: tuple | None = None  # None = config.diffusion.cfg_interval
  clip_x0: float | None = None      # None = config.diffusion.clip_x0
  best_of: int | None = None        # None = config.diffusion.best_of
  seed: int = 0
  batch_size: int = 48
  caption_tokens: int = 24          # longest generated caption
  text_records: int = 32            # held-out text records for perplexity
  shapesnet: str = ""               # ShapesNet .npz: loaded if it exists, else trained and saved there
  inception: str = ""               # FID Inception weights (.safetensors/.npz); "" = no fd_inception


def _log_to_stderr(msg: str) -> None:
  import sys
  if distributed.is_chief():  # several processes run the suite together: one log
    print(msg, file=sys.stderr, flush=True)


def sweep_suffix(cfg_scale, steps, first: bool) -> str:
  return "" if first else f"@cfg{cfg_scale:g}_steps{steps}"


def generate_images(gen, captions: list[str], *, batch_size: int, seed: int, cfg_scale, steps, sampler,
                    cfg_interval=None, clip_x0=None, best_of=None):
  """uint8 [N, H, W, 3]; sample i's noise depends only on (seed, i)."""
  return gen.text_to_image(captions, seed=seed, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                           cfg_interval=cfg_interval, clip_x0=clip_x0, best_of=best_of, batch_size=batch_size)


def generate_captions(gen, images: np.ndarray, *, batch_size: int, max_tokens: int, seed: int) -> list[str]:
  """Greedy captions of uint8 images."""
  return gen.caption(list(images), seed=seed, max_tokens=max_tokens, batch_size=batch_size)


def text_to_image_scores(pairs: eval_set.PairSet, images: np.ndarray) -> dict[str, float]:
  from tfx.data import shapes
  return t2i.summarize(pairs.prompts, t2i.score_images(pairs.prompts, images, shapes.score))


def caption_scores(pairs: eval_set.PairSet, generated: list[str]) -> dict[str, float]:
  from tfx.data import shapes
  scorer, meaning = (shapes.score, lambda text: shapes.parse_caption(text).canonical()) if pairs.has_kinds \
      else (None, None)
  return captioning.summarize(generated, pairs.captions, pairs.images, scorer,
                              held_out=[p.held_out for p in pairs.prompts], meaning=meaning,
                              kinds=[p.kind for p in pairs.prompts] if pairs.has_kinds else None)


def perplexities(config, model, gen, pairs: eval_set.PairSet, *, text_records: int,
                 batch_size: int) -> dict[str, float]:
  """ppl_text (held-out documents), ppl_caption (test captions alone), ppl_caption_given_image."""
  from flax import nnx
  nll_fn = perplexity.make_nll_fn(nnx.graphdef(model))
  out = {}
  records = eval_set.text_records(config, text_records)
  if records:
    out["ppl_text"], _ = perplexity.perplexity(model, eval_set.batches(records, batch_size), nll_fn)
  test = pairs.not_held_out()
  captions_only = eval_set.caption_records(config, test.captions)
  out["ppl_caption"], _ = perplexity.perplexity(model, eval_set.batches(captions_only, batch_size), nll_fn)
  with_images = eval_set.caption_records(config, test.captions, gen.image_patches(list(test.images)))
  out["ppl_caption_given_image"], _ = perplexity.perplexity(model, eval_set.batches(with_images, batch_size),
                                                            nll_fn)
  return out


def load_or_train_shapesnet(path: str, resolution: int, log: Callable = _log_to_stderr) -> shapesnet.ShapesNet:
  """The ShapesNet at `path` if it exists (at this resolution), else one trained now and saved there."""
  if path and fs.exists(path):
    net = shapesnet.load(path)
    if net.spec.resolution == resolution:
      return net
    raise ValueError(f"shapesnet {path} was trained at {net.spec.resolution} px, the model makes "
                     f"{resolution} px images; give another --shapesnet path")
  from tfx.data import shapes
  t0 = time.time()
  rng = np.random.default_rng(SHAPESNET_SEED)
  specs = [shapes.sample_spec(rng, shapes.COMBOS) for _ in range(SHAPESNET_IMAGES)]
  images = np.stack([shapes.render(s, resolution) for s in specs])
  labels = np.zeros((len(specs), len(shapes.COMBOS)), np.int32)
  for i, s in enumerate(specs):
    for o in s.objects:
      labels[i, shapes.COMBOS.index((o.color, o.shape))] += 1
  net, acc = shapesnet.train(images, labels, resolution=resolution, num_classes=4, steps=SHAPESNET_STEPS,
                             seed=SHAPESNET_SEED)
  log(f"trained shapesnet ({resolution} px) in {time.time() - t0:.0f}s, train accuracy {acc:.3f}")
  if path and distributed.is_chief():  # every process trained the same net (same seed): one writes it
    shapesnet.save(net, path)
  return net


def frechet_distances(generated: np.ndarray, real: np.ndarray, options: Options, resolution: int,
                      shapes_world: bool, log: Callable) -> dict[str, float]:
  """fd_shapesnet (ShapesNet features) and, with local weights, fd_inception."""
  out = {}
  if shapes_world:
    net = load_or_train_shapesnet(options.shapesnet, resolution, log)
    out["fd_shapesnet"] = fd.frechet_distance_of_features(shapesnet.features(net, generated),
                                                          shapesnet.features(net, _resize_to(real, resolution)))
  if options.inception:
    from tfx.eval import inception
    weights = inception.load_weights(options.inception)
    out["fd_inception"] = fd.frechet_distance_of_features(inception.features(weights, generated),
                                                          inception.features(weights, real))
  return out


def _resize_to(images: np.ndarray, side: int) -> np.ndarray:
  """Box-downsamples square uint8 images to `side` (as the data pipeline feeds the model)."""
  n, s = images.shape[:2]
  if s == side:
    return images
  if s % side:
    raise ValueError(f"cannot box-downsample {s} px images to {side} px")
  f = s // side
  return np.round(images.reshape(n, side, f, side, f, 3).mean((2, 4))).astype(np.uint8)


@dataclasses.dataclass
class Result:
  metrics: dict[str, float]
  pairs: eval_set.PairSet          # the prompts / ground truth evaluated
  images: np.ndarray               # uint8 images generated for the first sweep entry
  captions: list[str]              # generated captions of pairs.images


def run(config, model, options: Options = Options(), *, log: Callable = _log_to_stderr,
        generator=None) -> Result:
  """All metrics over `options.split` (+ held-out pairs), with what was generated."""
  from tfx import generate
  gen = generator or generate.Generator(config, model)
  t0 = time.time()
  pairs = eval_set.load_eval_pairs(config, options.split, options.num, options.num_heldout)
  log(f"evaluating on {len(pairs)} pairs ({sum(p.held_out for p in pairs.prompts)} held-out)")
  metrics, first_images = {}, None
  d = config.diffusion
  combos = [(d.cfg_scale if c is None else c, d.sample_steps if s is None else s)
            for c in options.cfg_scales for s in options.steps]
  for i, (cfg_scale, steps) in enumerate(combos):
    t = time.time()
    images = generate_images(gen, pairs.captions, batch_size=options.batch_size, seed=options.seed,
                             cfg_scale=cfg_scale, steps=steps, sampler=options.sampler,
                             cfg_interval=options.cfg_interval, clip_x0=options.clip_x0,
                             best_of=options.best_of)
    suffix = sweep_suffix(cfg_scale, steps, i == 0)
    scores = text_to_image_scores(pairs, images) if pairs.has_kinds else {}
    metrics.update({k + suffix: v for k, v in scores.items()})
    metrics["t2i_seconds" + suffix] = time.time() - t
    log(f"text-to-image cfg {cfg_scale:g}, {steps} steps: {time.time() - t:.0f}s"
        + (f", pass {scores['t2i_pass']:.1%}" if scores else ""))
    if i == 0:
      first_images = images
  t = time.time()
  generated = generate_captions(gen, pairs.images, batch_size=options.batch_size,
                                max_tokens=options.caption_tokens, seed=options.seed)
  metrics.update(caption_scores(pairs, generated))
  log(f"captioning: {time.time() - t:.0f}s, exact match {metrics['caption_exact_match']:.1%}")
  t = time.time()
  metrics.update(perplexities(config, model, gen, pairs, text_records=options.text_records,
                              batch_size=options.batch_size))
  log(f"perplexity: {time.time() - t:.0f}s")
  if pairs.has_kinds or options.inception:
    t = time.time()
    metrics.update(frechet_distances(first_images, pairs.images, options, config.image.resolution,
                                     pairs.has_kinds, log))
    log(f"frechet distance: {time.time() - t:.0f}s")
  metrics["eval_seconds"] = time.time() - t0
  return Result(metrics, pairs, first_images, generated)
