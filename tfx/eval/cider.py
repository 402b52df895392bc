"""CIDEr-D (Vedantam et al. 2015) in pure Python: no Java tokenizer, no download.

Follows the reference implementation (pycocoevalcap): n-grams 1..4 weighted by
tf-idf with document frequencies over the evaluated references, candidate counts
clipped by reference counts, a Gaussian length penalty (sigma 6), scaled by 10.
Scores are in pycocoevalcap units: identical captions score 10.0 at most; papers
report 100x this number (the paper's CIDEr 27.2 is 0.272 here).
"""
import collections
import math
import re
from typing import Sequence

MAX_N = 4
SIGMA = 6.0

_PUNCTUATION = re.compile(r"[^\w\s]")


def tokenize(caption: str) -> list[str]:
  """Lower-cases, drops punctuation, splits on whitespace."""
  return _PUNCTUATION.sub(" ", caption.lower()).split()


def _ngram_counts(words: list[str]) -> collections.Counter:
  counts = collections.Counter()
  for n in range(1, MAX_N + 1):
    for i in range(len(words) - n + 1):
      counts[tuple(words[i:i + n])] += 1
  return counts


def _tfidf(counts: collections.Counter, df: dict, log_num_docs: float):
  """Per-n tf-idf vectors, their norms, and the sentence length."""
  vecs = [dict() for _ in range(MAX_N)]
  norms = [0.0] * MAX_N
  for gram, tf in counts.items():
    n = len(gram) - 1
    w = tf * (log_num_docs - math.log(max(1.0, df.get(gram, 0.0))))
    vecs[n][gram] = w
    norms[n] += w * w
  length = sum(c for g, c in counts.items() if len(g) == 1)
  return vecs, [math.sqrt(x) for x in norms], length


def _similarity(cand, ref) -> list[float]:
  """CIDEr-D similarity per n: clipped cosine times the length penalty."""
  (vc, nc, lc), (vr, nr, lr) = cand, ref
  delta = float(lc - lr)
  sims = []
  for n in range(MAX_N):
    dot = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vc[n].items())
    sim = dot / (nc[n] * nr[n]) if nc[n] and nr[n] else 0.0
    sims.append(sim * math.exp(-(delta ** 2) / (2 * SIGMA ** 2)))
  return sims


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
  """Corpus CIDEr-D: (mean score, per-candidate scores); references[i] lists item i's references."""
  if len(candidates) != len(references):
    raise ValueError(f"cider_d: {len(candidates)} candidates but {len(references)} reference lists")
  if not candidates:
    raise ValueError("cider_d: no candidates to score")
  ref_counts = [[_ngram_counts(tokenize(r)) for r in refs] for refs in references]
  if any(not refs for refs in ref_counts):
    raise ValueError("cider_d: every candidate needs at least one reference")
  df = collections.Counter()
  for counts in ref_counts:
    for gram in set().union(*counts):
      df[gram] += 1
  log_num_docs = math.log(float(len(candidates)))
  scores = []
  for cand, refs in zip(candidates, ref_counts):
    vc = _tfidf(_ngram_counts(tokenize(cand)), df, log_num_docs)
    total = 0.0
    for ref in refs:
      total += sum(_similarity(vc, _tfidf(ref, df, log_num_docs))) / MAX_N
    scores.append(10.0 * total / len(refs))
  return sum(scores) / len(scores), scores
