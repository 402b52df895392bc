"""Each evaluation metric against a case computed by hand."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfx.eval import captioning, cider, fd, inception, perplexity, shapesnet, t2i


# -- CIDEr-D ------------------------------------------------------------------

def test_cider_identical_captions_score_the_maximum():
  caps = ["a red circle to the left of a blue square", "two green triangles above a square",
          "three purple circles in a row", "an orange triangle below a yellow circle"]
  mean, scores = cider.cider_d(caps, [[c] for c in caps])
  assert scores == pytest.approx([10.0] * 4)
  assert mean == pytest.approx(10.0)
  worse, _ = cider.cider_d(caps[1:] + caps[:1], [[c] for c in caps])
  assert worse < mean


def test_cider_hand_computed_length_penalty_and_cosines():
  # Item 0: candidate "a b c d" vs reference "a b c d e f"; item 1 shares no words,
  # so every n-gram has df = 1 and the same idf: cosines are count ratios.
  mean, scores = cider.cider_d(["a b c d", "x y"], [["a b c d e f"], ["p q r s"]])
  cosines = [4 / (2 * math.sqrt(6)), 3 / (math.sqrt(3) * math.sqrt(5)),
             2 / (math.sqrt(2) * 2), 1 / math.sqrt(3)]
  expected = 10 * math.exp(-4 / 72) * sum(cosines) / 4
  assert scores[0] == pytest.approx(expected, rel=1e-12)
  assert scores[1] == 0.0
  assert mean == pytest.approx(expected / 2)


def test_cider_clips_repeated_words_and_ignores_case_and_punctuation():
  clipped, _ = cider.cider_d(["red red red red", "x"], [["red circle", "y"], ["z"]])
  plain, _ = cider.cider_d(["Red circle.", "x"], [["red circle", "y"], ["z"]])
  assert plain == pytest.approx(cider.cider_d(["red circle", "x"], [["red circle", "y"], ["z"]])[0])
  assert clipped < plain
  with pytest.raises(ValueError, match="reference"):
    cider.cider_d(["a"], [["a"], ["b"]])


# -- Frechet distance ----------------------------------------------------------

def test_fd_of_a_set_with_itself_is_zero():
  x = np.random.default_rng(0).normal(size=(300, 8)) @ np.random.default_rng(1).normal(size=(8, 8))
  assert fd.frechet_distance_of_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fd_hand_computed_for_diagonal_gaussians():
  mu_a, mu_b = np.array([0.0, 1.0]), np.array([3.0, -1.0])
  var_a, var_b = np.array([1.0, 4.0]), np.array([9.0, 1.0])
  expected = 9 + 4 + sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))  # 13 + (1+9-6) + (4+1-4)
  got = fd.frechet_distance(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
  assert got == pytest.approx(expected) == pytest.approx(18.0)
  with pytest.raises(ValueError, match="at least 2"):
    fd.statistics(np.zeros((1, 3)))


# -- perplexity ------------------------------------------------------------------

class _UniformLM(nnx.Module):
  """Emits equal logits everywhere: perplexity must be the vocabulary size."""

  def __init__(self, vocab: int):
    self.scale = nnx.Param(jnp.zeros(()))
    self.vocab = vocab

  def __call__(self, batch, t_BL, *, cache=None):
    b, l = batch["tokens"].shape
    return jnp.zeros((b, l, self.vocab)) + self.scale, jnp.zeros((b, l, 3)), None


def _text_batch(b=2, l=6, vocab=11):
  rng = np.random.default_rng(0)
  batch = {k: np.zeros((b, l), np.int32) for k in perplexity.MODEL_FIELDS}
  batch["patches"] = np.zeros((b, l, 3), np.float32)
  batch["lm_targets"] = rng.integers(0, vocab, (b, l)).astype(np.int32)
  batch["lm_mask"] = (rng.random((b, l)) < 0.7).astype(np.float32)
  return batch


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
  batch = _text_batch()
  ppl, tokens = perplexity.perplexity(_UniformLM(11), [batch, batch])
  assert ppl == pytest.approx(11.0, rel=1e-5)
  assert tokens == 2 * int(batch["lm_mask"].sum())


def test_token_nll_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5)).astype(np.int32)
  mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
  lp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  ref = -(np.take_along_axis(lp, targets[..., None], -1)[..., 0] * mask).sum()
  s, n = perplexity.token_nll_sum(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert float(s) == pytest.approx(ref, rel=1e-5) and float(n) == 7


# -- aggregation with a stand-in scorer (the real scorer's cases are below) -----

def test_t2i_summary_counts_kinds_attributes_and_held_out():
  prompts = [t2i.Prompt("a red circle", "single", False), t2i.Prompt("two blue squares", "count", True),
             t2i.Prompt("a red circle above a blue square", "relation", True)]
  verdicts = [dict(passed=True, color=True, shape=True, count=True, position=None),
              dict(passed=False, color=True, shape=False, count=False, position=None),
              dict(passed=False, color=True, shape=True, count=True, position=False)]
  verdicts[0]["position"] = True  # the scorer's answer for captions without a relation: not counted
  s = t2i.summarize(prompts, verdicts)
  # the seen combinations and the held-out ones are scored apart, never mixed
  assert (s["t2i_pass"], s["t2i_pass_single"], s["t2i_shape_acc"], s["t2i_num"]) == (1.0, 1.0, 1.0, 1.0)
  assert "t2i_pass_count" not in s and "t2i_position_acc" not in s
  assert (s["t2i_heldout_pass"], s["t2i_heldout_pass_count"], s["t2i_heldout_pass_relation"]) == (0.0, 0.0, 0.0)
  assert s["t2i_heldout_shape_acc"] == 0.5 and s["t2i_heldout_position_acc"] == 0.0
  assert s["t2i_heldout_color_acc"] == 1.0 and "t2i_heldout_pass_single" not in s
  both = t2i.summarize([t2i.Prompt(p.caption, p.kind, False) for p in prompts], verdicts)
  assert both["t2i_pass"] == pytest.approx(1 / 3) and both["t2i_shape_acc"] == pytest.approx(2 / 3)
  assert "t2i_heldout_pass" not in both and both["t2i_num"] == 3.0
  with pytest.raises(ValueError, match="kind"):
    t2i.summarize([t2i.Prompt("x", "scene", False)], verdicts[:1])


# -- ShapesNet ---------------------------------------------------------------------

def test_shapesnet_learns_and_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, (256, 1))
  images = np.full((256, 32, 32, 3), 255, np.uint8)
  for i, q in enumerate(labels[:, 0]):
    r, c = divmod(int(q), 2)
    images[i, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = (40, 80, 220)
  model, acc = shapesnet.train(images, labels, resolution=16, num_classes=4, steps=60)
  assert acc > 0.9
  path = str(tmp_path / "shapesnet.npz")
  shapesnet.save(model, path)
  again = shapesnet.load(path)
  np.testing.assert_array_equal(shapesnet.features(model, images[:8]), shapesnet.features(again, images[:8]))
  with pytest.raises(ValueError, match="npz"):
    shapesnet.load(str(tmp_path / "weights.pth"))


# -- Inception (FID network) from a local weights file -------------------------------

def _random_inception_weights(seed=0):
  rng = np.random.default_rng(seed)
  weights = {}
  for key, shape in inception.required_keys().items():
    if key.endswith("conv.weight"):
      weights[key] = (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)
    elif key.endswith(("bn.weight", "running_var")):
      weights[key] = np.ones(shape, np.float32)
    else:
      weights[key] = np.zeros(shape, np.float32)
  return weights


def test_inception_loads_safetensors_and_gives_2048_features(tmp_path):
  from safetensors.numpy import save_file
  weights = _random_inception_weights()
  assert sum(int(np.prod(v.shape)) for v in weights.values()) == 21_820_000  # pytorch-fid's network sans fc
  path = str(tmp_path / "inception.safetensors")
  save_file(weights, path)
  loaded = inception.load_weights(path)
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  feats = inception.features(loaded, images, side=75)
  assert feats.shape == (3, 2048) and np.isfinite(feats).all() and feats.std() > 0
  assert fd.frechet_distance_of_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
  broken = dict(weights)
  broken["Mixed_7c.branch_pool.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  np.savez(str(tmp_path / "broken.npz"), **broken)
  with pytest.raises(ValueError, match="Mixed_7c.branch_pool.conv.weight"):
    inception.load_weights(str(tmp_path / "broken.npz"))
  with pytest.raises(ValueError, match="never unpickles"):
    inception.load_weights(str(tmp_path / "pt_inception.pth"))


def test_inception_average_pool_excludes_padding():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  got = np.asarray(inception._avg_pool_same(x))[0, :, :, 0]
  ref = np.array([[np.mean(np.arange(16.0).reshape(4, 4)[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2])
                   for j in range(4)] for i in range(4)])
  np.testing.assert_allclose(got, ref, rtol=1e-6)


# -- the real shapes scorer: perfect and blank generators, perfect captioner -------------

@pytest.fixture(scope="module")
def scenes():
  from tfx.data import shapes
  rng = np.random.default_rng(7)
  specs = [shapes.sample_spec(rng, kind=k) for k in t2i.KINDS for _ in range(4)]
  prompts = [t2i.Prompt(shapes.caption(s), s.kind, i % 2 == 0) for i, s in enumerate(specs)]
  images_32 = np.stack([shapes.render(s, 32) for s in specs])   # the default model's resolution
  return prompts, images_32


def test_t2i_perfect_generator_scores_100_and_blank_images_0(scenes):
  from tfx.data import shapes
  prompts, perfect = scenes
  best = t2i.summarize(prompts, t2i.score_images(prompts, perfect, shapes.score))
  for key in ("t2i_pass", "t2i_pass_single", "t2i_pass_count", "t2i_pass_relation", "t2i_color_acc",
              "t2i_shape_acc", "t2i_count_acc", "t2i_position_acc", "t2i_heldout_pass"):
    assert best[key] == 1.0, key
  blank = np.full_like(perfect, 255)
  worst = t2i.summarize(prompts, t2i.score_images(prompts, blank, shapes.score))
  assert worst["t2i_pass"] == 0.0 and worst["t2i_color_acc"] == 0.0 and worst["t2i_heldout_pass"] == 0.0


def test_captioning_perfect_captioner_and_wrong_captions(scenes):
  from tfx.data import shapes
  prompts, images = scenes
  refs = [p.caption for p in prompts]
  held = [p.held_out for p in prompts]
  best = captioning.summarize([r.upper() + "." for r in refs], refs, images, shapes.score, held)
  assert best["caption_exact_match"] == 1.0 and best["caption_scorer_pass"] == 1.0
  assert best["caption_heldout_exact_match"] == 1.0 and best["caption_num"] == len(refs) - sum(held)
  # wrong captions of held-out images move only the held-out rates
  mixed = [r if not h else "a red circle above a red circle" for r, h in zip(refs, held)]
  s = captioning.summarize(mixed, refs, images, shapes.score, held)
  assert s["caption_exact_match"] == 1.0 and s["caption_scorer_pass"] == 1.0
  assert s["caption_heldout_exact_match"] == 0.0 and s["caption_heldout_scorer_pass"] == 0.0
  assert best["caption_cider_d"] == pytest.approx(cider.cider_d(refs, [[r] for r in refs])[0])
  # the same scenes worded differently pass the read-back but are no exact match
  flip = {"to the left of": "to the right of", "above": "below"}
  reworded, expect = [], []
  for p in prompts:
    q = shapes.parse_caption(p.caption)
    if q.kind == "relation" and q.relation in flip:
      a, b = p.caption.split(f" {q.relation} ")
      reworded.append(f"{b} {flip[q.relation]} {a}")
      expect.append(True)
    else:
      reworded.append(p.caption)
      expect.append(False)
  assert any(expect)
  s = captioning.summarize(reworded, refs, images, shapes.score)
  assert s["caption_scorer_pass"] == 1.0 and s["caption_exact_match"] == pytest.approx(1 - np.mean(expect))
  # ... unless exact match compares meaning: then the flipped relations match too
  meaning = lambda text: shapes.parse_caption(text).canonical()
  s = captioning.summarize(reworded, refs, images, shapes.score, meaning=meaning)
  assert s["caption_exact_match"] == 1.0 and s["caption_exact_text"] == pytest.approx(1 - np.mean(expect))
  # a true but different relation ("above" for "to the left of") is no match in meaning either
  other = {"to the left of": "above", "to the right of": "below", "above": "to the left of",
           "below": "to the right of"}
  swapped = [r if shapes.parse_caption(r).kind != "relation" else
             r.replace(shapes.parse_caption(r).relation, other[shapes.parse_caption(r).relation]) for r in refs]
  s = captioning.summarize(swapped, refs, images, shapes.score, meaning=meaning,
                           kinds=[p.kind for p in prompts])
  assert s["caption_exact_match"] == pytest.approx(2 / 3)
  # ... and the per-kind rates say which kind failed
  assert (s["caption_exact_match_single"], s["caption_exact_match_count"],
          s["caption_exact_match_relation"]) == (1.0, 1.0, 0.0)
  for m in (None, meaning):
    wrong = captioning.summarize(["a purple circle"] * len(refs), refs, images, shapes.score, meaning=m)
    assert wrong["caption_scorer_pass"] < 0.2 and wrong["caption_exact_match"] <= 1 / len(refs)
    garbage = captioning.summarize(["zzz"] * len(refs), refs, images, shapes.score, meaning=m)
    assert garbage["caption_scorer_pass"] == 0.0 and garbage["caption_exact_match"] == 0.0
