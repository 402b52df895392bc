"""Text-to-image scores: the shapes scorer's verdicts on generated images, aggregated.

Rates are fractions in [0, 1]: overall pass, pass per caption kind (single = one
object, count, relation), colour / shape / count / position accuracies (over the
prompts where the scorer judged that attribute), and the same for prompts whose
colour-shape combinations never appear in training (`heldout_` prefix).
"""
import dataclasses
from typing import Callable, Sequence

import numpy as np

ATTRIBUTES = ("color", "shape", "count", "position")
KINDS = ("single", "count", "relation")   # as tfx.data.shapes names them

Scorer = Callable[[np.ndarray, str], dict]


@dataclasses.dataclass(frozen=True)
class Prompt:
  caption: str
  kind: str          # one of KINDS
  held_out: bool     # its colour-shape combinations are never in train


def score_images(prompts: Sequence[Prompt], images_NHWC: np.ndarray, scorer: Scorer) -> list[dict]:
  """The scorer's verdict for each (prompt, generated uint8 image)."""
  if len(prompts) != len(images_NHWC):
    raise ValueError(f"{len(prompts)} prompts but {len(images_NHWC)} images")
  return [scorer(np.asarray(img), p.caption) for p, img in zip(prompts, images_NHWC)]


def _rate(values) -> float | None:
  values = [bool(v) for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _summarize_group(verdicts: list[dict], kinds: list[str], prefix: str) -> dict[str, float]:
  out = {f"{prefix}pass": _rate(v["passed"] for v in verdicts)}
  for kind in KINDS:
    out[f"{prefix}pass_{kind}"] = _rate(v["passed"] for v, k in zip(verdicts, kinds) if k == kind)
  for attr in ATTRIBUTES:
    # only relation captions state a position (the scorer says True for the others)
    out[f"{prefix}{attr}_acc"] = _rate(v.get(attr) for v, k in zip(verdicts, kinds)
                                       if attr != "position" or k == "relation")
  return {k: v for k, v in out.items() if v is not None}


def summarize(prompts: Sequence[Prompt], verdicts: Sequence[dict]) -> dict[str, float]:
  """Pass rates and attribute accuracies, keys prefixed `t2i_` over the prompts of seen
  combinations and `t2i_heldout_` over the held-out ones (never mixed: the floors are on the
  test split). `t2i_num` counts the first group."""
  for p in prompts:
    if p.kind not in KINDS:
      raise ValueError(f"prompt {p.caption!r} has kind {p.kind!r}; expected one of {KINDS}")
  out = {}
  for held_out, prefix in ((False, "t2i_"), (True, "t2i_heldout_")):
    group = [(v, p.kind) for v, p in zip(verdicts, prompts) if p.held_out == held_out]
    if group:
      out.update(_summarize_group([v for v, _ in group], [k for _, k in group], prefix))
  out["t2i_num"] = float(sum(not p.held_out for p in prompts))
  return out
