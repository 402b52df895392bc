"""Captioning scores: exact match, the scorer's verdict on the caption read back, CIDEr-D.

The read-back verdict asks: if the generated caption were a prompt, would the
ground-truth image pass it? A fluent but wrong caption fails; a correct caption
worded differently from the reference passes.
"""
from typing import Callable, Sequence

import numpy as np

from tfx.eval import cider

Scorer = Callable[[np.ndarray, str], dict]


def normalize(caption: str) -> str:
  return " ".join(cider.tokenize(caption))


def read_back_verdict(image: np.ndarray, caption: str, scorer: Scorer) -> bool:
  """Whether `image` passes `caption`; a caption the scorer cannot parse fails."""
  try:
    return bool(scorer(np.asarray(image), caption)["passed"])
  except ValueError:
    return False


def summarize(generated: Sequence[str], references: Sequence[str], images_NHWC: np.ndarray,
              scorer: Scorer | None, held_out: Sequence[bool] | None = None) -> dict[str, float]:
  """Rates in [0, 1] (`caption_exact_match`, `caption_scorer_pass` when a scorer is given) and
  `caption_cider_d` (0..10), plus `caption_heldout_*` rates over the held-out items."""
  if not (len(generated) == len(references) == len(images_NHWC)):
    raise ValueError(f"captioning: {len(generated)} captions, {len(references)} references, "
                     f"{len(images_NHWC)} images; they must match")
  exact = np.array([normalize(g) == normalize(r) for g, r in zip(generated, references)])
  cider_mean, _ = cider.cider_d(list(generated), [[r] for r in references])
  out = {"caption_exact_match": float(exact.mean()), "caption_cider_d": float(cider_mean),
         "caption_num": float(len(generated))}
  mask = np.asarray(held_out, bool) if held_out is not None and any(held_out) else None
  if mask is not None:
    out["caption_heldout_exact_match"] = float(exact[mask].mean())
  if scorer is not None:
    passed = np.array([read_back_verdict(img, g, scorer) for img, g in zip(images_NHWC, generated)])
    out["caption_scorer_pass"] = float(passed.mean())
    if mask is not None:
      out["caption_heldout_scorer_pass"] = float(passed[mask].mean())
  return out
