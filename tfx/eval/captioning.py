"""Captioning scores: exact match, the scorer's verdict on the caption read back, CIDEr-D.

The read-back verdict asks: if the generated caption were a prompt, would the
ground-truth image pass it? A fluent but wrong caption fails; a correct caption
worded differently from the reference passes.
"""
from typing import Callable, Hashable, Sequence

import numpy as np

from tfx.eval import cider

Scorer = Callable[[np.ndarray, str], dict]


def normalize(caption: str) -> str:
  return " ".join(cider.tokenize(caption))


def exact_matches(generated: Sequence[str], references: Sequence[str],
                  meaning: Callable[[str], Hashable] | None = None) -> np.ndarray:
  """Per caption: equal to its reference as normalized text, or, with `meaning` (a parser
  of the caption grammar), equal in meaning ("A left of B" == "B right of A"); a
  generated caption `meaning` cannot parse never matches."""
  def parsed(text):
    try:
      return meaning(text)
    except ValueError:
      return None
  if meaning is None:
    return np.array([normalize(g) == normalize(r) for g, r in zip(generated, references)], bool)
  return np.array([(m := parsed(g)) is not None and m == meaning(r) for g, r in zip(generated, references)],
                  bool)


def read_back_verdict(image: np.ndarray, caption: str, scorer: Scorer) -> bool:
  """Whether `image` passes `caption`; a caption the scorer cannot parse fails."""
  try:
    return bool(scorer(np.asarray(image), caption)["passed"])
  except ValueError:
    return False


def summarize(generated: Sequence[str], references: Sequence[str], images_NHWC: np.ndarray,
              scorer: Scorer | None, held_out: Sequence[bool] | None = None,
              meaning: Callable[[str], Hashable] | None = None,
              kinds: Sequence[str] | None = None) -> dict[str, float]:
  """Rates in [0, 1] (`caption_exact_match` in meaning when `meaning` is given, else as text,
  and per caption kind as `caption_exact_match_<kind>` when `kinds` are given;
  `caption_exact_text`; `caption_scorer_pass` when a scorer is given) and `caption_cider_d`
  (0..10) over the items of seen combinations, and `caption_heldout_*` rates over the
  held-out items (never mixed). `caption_num` counts the first group."""
  if not (len(generated) == len(references) == len(images_NHWC)):
    raise ValueError(f"captioning: {len(generated)} captions, {len(references)} references, "
                     f"{len(images_NHWC)} images; they must match")
  held_N = np.zeros(len(generated), bool) if held_out is None else np.asarray(held_out, bool)
  exact = exact_matches(generated, references, meaning)
  exact_text = exact_matches(generated, references)
  passed = (np.array([read_back_verdict(img, g, scorer) for img, g in zip(images_NHWC, generated)])
            if scorer is not None else None)
  out = {}
  seen = np.flatnonzero(~held_N)
  if len(seen):
    cider_mean, _ = cider.cider_d([generated[i] for i in seen], [[references[i]] for i in seen])
    out.update(caption_exact_match=float(exact[seen].mean()), caption_exact_text=float(exact_text[seen].mean()),
               caption_cider_d=float(cider_mean))
    if passed is not None:
      out["caption_scorer_pass"] = float(passed[seen].mean())
    if kinds is not None:
      kind_N = np.asarray(kinds)
      for kind in dict.fromkeys(kind_N[seen]):
        out[f"caption_exact_match_{kind}"] = float(exact[seen][kind_N[seen] == kind].mean())
  out["caption_num"] = float(len(seen))
  if held_N.any():
    out["caption_heldout_exact_match"] = float(exact[held_N].mean())
    if passed is not None:
      out["caption_heldout_scorer_pass"] = float(passed[held_N].mean())
  return out
