"""Edit scores: the shapes scorer's exact verdict on an edited image, and per-kind rates.

An edit passes when
  caption  the target's caption passes shapes.score on the edited image (colour, shape,
           count, and the relation where the instruction states one: "add" names no
           place, so the relation its ground-truth target happens to have is not asked);
  keep     every object the instruction left in place (Edit.kept: the recoloured
           object too, the reference of a move, what an add or remove leaves) is
           detected with its target colour and shape within KEEP_TOLERANCE pixels
           (64 px canvas) of where the target has it.
An unedited source fails by construction: its colours, count or relation differ.
"""
import dataclasses
import math
from typing import Sequence

import numpy as np

from tfx.data import shapes, shapes_edit

KEEP_TOLERANCE = 5.0   # pixels of the 64 px canvas; objects are 12-30 px wide


def _centroid(o: shapes.Obj) -> tuple[float, float]:
  """Where shapes.detect puts the object's centre: a triangle's mass sits a sixth of its height low."""
  return o.cx, o.cy + (o.size / 6 if o.shape == "triangle" else 0.0)


def score_edit(image: np.ndarray, edit: shapes_edit.Edit) -> dict:
  """dict(kind, caption, keep, passed) for a square uint8 RGB edited image (any size)."""
  s = shapes.score(image, shapes.caption(edit.target))
  caption_ok = s["color"] and s["shape"] and s["count"] and (s["position"] or edit.kind == "add")
  found = shapes.detect(image)
  keep_ok = True
  for i in edit.kept:
    o = edit.target.objects[i]
    x, y = _centroid(o)
    keep_ok &= any(d.color == o.color and d.shape == o.shape and math.hypot(d.cx - x, d.cy - y) <= KEEP_TOLERANCE
                   for d in found)
  return dict(kind=edit.kind, caption=bool(caption_ok), keep=bool(keep_ok), passed=bool(caption_ok and keep_ok))


def summarize(verdicts: Sequence[dict], held_out: Sequence[bool] | None = None) -> dict[str, float]:
  """edit_pass / edit_caption / edit_keep overall and per kind (`_recolour`, ...); the held-out
  edits (if any) under an `edit_heldout_` prefix. Rates are fractions in [0, 1]."""
  held_out = list(held_out) if held_out is not None else [False] * len(verdicts)
  out = {}
  for flag, prefix in ((False, "edit_"), (True, "edit_heldout_")):
    group = [v for v, h in zip(verdicts, held_out) if h == flag]
    if not group:
      continue
    for what in ("pass", "caption", "keep"):
      key = "passed" if what == "pass" else what
      out[f"{prefix}{what}"] = float(np.mean([v[key] for v in group]))
      for kind in shapes_edit.KINDS:
        vs = [v[key] for v in group if v["kind"] == kind]
        if vs:
          out[f"{prefix}{what}_{kind}"] = float(np.mean(vs))
    out[f"{prefix}num"] = float(len(group))
  return out


# -- evaluating a model ------------------------------------------------------------


@dataclasses.dataclass
class EditSet:
  """Edits with their ground-truth uint8 source and target images."""
  edits: list[shapes_edit.Edit]
  sources: np.ndarray           # uint8 [N, H, W, 3]
  targets: np.ndarray
  held_out: list[bool]

  def __len__(self) -> int:
    return len(self.edits)

  def __add__(self, other: "EditSet") -> "EditSet":
    if not len(other):
      return self
    return EditSet(self.edits + other.edits, np.concatenate([self.sources, other.sources]),
                   np.concatenate([self.targets, other.targets]), self.held_out + other.held_out)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_edits(config, split: str, num: int, *, held_out: bool = False) -> EditSet:
  """The first num // 4 edits of each kind (the rest to the first kinds) of `split` of the
  run's edit dataset (config.data.image_text, e.g. the built-in shapes_edit)."""
  from tfx.data import builders, builtin
  path = builtin.resolve(config, config.data.image_text)
  if "instruction" not in builders.feature_names(path):
    raise ValueError(f"data.image_text {config.data.image_text!r} is not an edit dataset (no `instruction`); "
                     "edits are evaluated on a run trained on one, e.g. experiments/shapes_edit.py")
  source = builders.open_split(path, split)
  kinds = shapes_edit.KINDS
  want = {k: num // len(kinds) + (i < num % len(kinds)) for i, k in enumerate(kinds)}
  edits, sources, targets = [], [], []
  for i in range(len(source)):
    if not any(want.values()):
      break
    ex = source[i]
    edit = shapes_edit.Edit.from_json(_text(ex["edit"]))
    if want[edit.kind] == 0:
      continue
    want[edit.kind] -= 1
    edits.append(edit)
    sources.append(np.asarray(ex["source_image"]))
    targets.append(np.asarray(ex["target_image"]))
  if not edits:
    raise ValueError(f"split {split!r} of {path} holds no edits to evaluate")
  return EditSet(edits, np.stack(sources), np.stack(targets), [held_out] * len(edits))


def edit_images(gen, images, instructions: Sequence[str], *, seed: int = 0, steps=None, cfg_scale=None,
                sampler=None, progress=None) -> np.ndarray:
  """uint8 [N, H, W, 3]: image i edited by instruction i (`BOS BOI image EOI instruction BOI` ->
  a new image), with noise from seed + i. steps / cfg_scale / sampler default to the config."""
  if len(images) != len(instructions):
    raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
  out = []
  for i, (image, instruction) in enumerate(zip(images, instructions)):
    made = gen.generate([np.asarray(image), instruction], seed=seed + i, max_tokens=0, max_images=1,
                        image_next=True, steps=steps, cfg_scale=cfg_scale, sampler=sampler)
    out.append(made[-1])
    if progress is not None:
      progress(i + 1, len(images))
  return np.stack(out)


@dataclasses.dataclass
class Options:
  split: str = "test"
  num: int = 96                 # edits of `split`, an equal share per kind
  num_heldout: int = 0          # edits of the heldout split (held-out colour-shape combinations)
  seed: int = 0
  steps: int | None = None      # None = config.diffusion.sample_steps
  cfg_scale: float | None = None   # None = config.diffusion.cfg_scale
  sampler: str | None = None    # None = config.diffusion.sampler


@dataclasses.dataclass
class Result:
  metrics: dict[str, float]
  edits: EditSet
  images: np.ndarray            # the edited images
  verdicts: list[dict]


def run(config, model, options: Options = Options(), *, log=print, generator=None) -> Result:
  """Edits `options.num` (+ held-out) sources with the model and scores them."""
  import time
  from tfx import generate
  gen = generator or generate.Generator(config, model)
  t0 = time.time()
  edits = load_edits(config, options.split, options.num)
  if options.num_heldout:
    edits = edits + load_edits(config, "heldout", options.num_heldout, held_out=True)
  log(f"editing {len(edits)} sources ({sum(edits.held_out)} held-out)")
  progress = lambda done, total: done % 24 == 0 and log(f"edits {done}/{total} ({time.time() - t0:.0f}s)")
  images = edit_images(gen, edits.sources, [e.instruction for e in edits.edits], seed=options.seed,
                       steps=options.steps, cfg_scale=options.cfg_scale, sampler=options.sampler, progress=progress)
  verdicts = [score_edit(img, e) for img, e in zip(images, edits.edits)]
  metrics = summarize(verdicts, edits.held_out)
  metrics["edit_seconds"] = time.time() - t0
  return Result(metrics, edits, images, verdicts)


def format_table(metrics: dict[str, float]) -> str:
  """Pass / caption / keep rates per kind, one line each."""
  lines = [f"{'edits':<24}{'pass':>8}{'caption':>9}{'keep':>8}"]
  for prefix, label in (("edit_", ""), ("edit_heldout_", "held-out ")):
    if f"{prefix}pass" not in metrics:
      continue
    for kind in ("",) + shapes_edit.KINDS:
      suffix = f"_{kind}" if kind else ""
      if f"{prefix}pass{suffix}" in metrics:
        rates = "".join(f"{metrics[f'{prefix}{w}{suffix}']:>{n}.1%}" for w, n in (("pass", 8), ("caption", 9),
                                                                                  ("keep", 8)))
        lines.append(f"{label + (kind or 'all'):<24}{rates}")
  return "\n".join(lines)
