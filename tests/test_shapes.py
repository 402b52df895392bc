"""The shapes world: captions, renderer, held-out combinations and the pixel scorer."""
import numpy as np
import pytest
from PIL import Image

from tfx.data import builders, builtin, shapes
from data_testing import small_config

N_SCORED = 300


@pytest.fixture(scope="module")
def scenes():
  rng = np.random.default_rng(7)
  specs = [shapes.sample_spec(rng) for _ in range(N_SCORED)]
  return specs, [shapes.render(s) for s in specs], [shapes.caption(s) for s in specs]


def test_caption_grammar():
  o = lambda c, s, x=20.0: shapes.Obj(c, s, x, 30.0, 12.0)
  assert shapes.caption(shapes.Spec("single", (o("red", "circle"),))) == "a red circle"
  assert shapes.caption(shapes.Spec("single", (o("orange", "triangle"),))) == "an orange triangle"
  assert shapes.caption(shapes.Spec("count", (o("blue", "square"), o("blue", "square", 45)))) == "two blue squares"
  rel = shapes.Spec("relation", (o("red", "circle"), o("blue", "square", 45)), "to the left of")
  assert shapes.caption(rel) == "a red circle to the left of a blue square"
  q = shapes.parse_caption("a red circle to the left of a blue square")
  assert q.groups == ((1, "red", "circle"), (1, "blue", "square")) and q.relation == "to the left of"
  assert q.canonical() == shapes.parse_caption("a blue square to the right of a red circle").canonical()
  assert shapes.parse_caption("three green circles").groups == ((3, "green", "circle"),)
  with pytest.raises(ValueError, match="grammar"):
    shapes.parse_caption("a pink hexagon")


def test_render_follows_spec(scenes):
  specs, images, captions = scenes
  for spec, image, cap in zip(specs[:50], images, captions):
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == (255, 255, 255)
    assert cap == cap.lower() and not cap.endswith(".")
    for o in spec.objects:
      assert o.size >= 8
      # The centre of a circle/square, and a point low in a triangle, is the exact palette colour.
      y = int(o.cy + (o.size / 4 if o.shape == "triangle" else 0))
      assert tuple(image[y, int(o.cx)]) == shapes.COLORS[o.color]
  # Anti-aliased: edges hold blends, not just palette colours and white.
  palette = {tuple(c) for c in shapes.COLORS.values()} | {(255, 255, 255)}
  assert any(tuple(p) not in palette for p in images[0].reshape(-1, 3))
  kinds = {s.kind for s in specs}
  assert kinds == set(shapes.KINDS)
  assert {len(s.objects) for s in specs if s.kind == "count"} == {2, 3}


def test_scorer_passes_clean_renders_at_64_and_32_px(scenes):
  _, images, captions = scenes
  full = np.mean([shapes.score(im, c)["passed"] for im, c in zip(images, captions)])
  small = [np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BOX)) for im in images]
  half = np.mean([shapes.score(im, c)["passed"] for im, c in zip(small, captions)])
  rng = np.random.default_rng(0)
  noisy = [np.clip(im + rng.normal(0, 10, im.shape), 0, 255).astype(np.uint8) for im in small]
  speckled = np.mean([shapes.score(im, c)["passed"] for im, c in zip(noisy, captions)])
  print(f"scorer pass rate on clean renders: 64px {full:.3f}, 32px {half:.3f}, 32px + noise(10) {speckled:.3f}")
  assert full >= 0.98 and half >= 0.98 and speckled >= 0.95


def test_scorer_rejects_wrong_captions(scenes):
  _, images, captions = scenes
  passed = []
  for i, image in enumerate(images):
    j = (i + 1) % len(captions)
    while shapes.parse_caption(captions[j]).canonical() == shapes.parse_caption(captions[i]).canonical():
      j = (j + 1) % len(captions)
    passed.append(shapes.score(image, captions[j])["passed"])
  print(f"scorer pass rate with wrong captions: {np.mean(passed):.3f}")
  assert np.mean(passed) < 0.02


def test_scorer_reports_each_aspect():
  spec = shapes.Spec("relation", (shapes.Obj("red", "circle", 15, 32, 14), shapes.Obj("blue", "square", 48, 32, 14)),
                     "to the left of")
  image = shapes.render(spec)
  assert shapes.score(image, "a red circle to the left of a blue square")["passed"]
  r = shapes.score(image, "a red circle to the right of a blue square")
  assert (r["color"], r["shape"], r["count"], r["position"], r["passed"]) == (True, True, True, False, False)
  r = shapes.score(image, "a red triangle to the left of a blue square")
  assert r["color"] and not r["shape"] and not r["passed"]
  r = shapes.score(image, "two red circles")
  assert not r["count"] and not r["passed"]
  blank = np.full((32, 32, 3), 255, np.uint8)
  assert not shapes.score(blank, "a red circle")["passed"]
  with pytest.raises(ValueError, match="square RGB"):
    shapes.score(np.zeros((32, 16, 3), np.uint8), "a red circle")


def test_heldout_combinations_never_in_train():
  rng = np.random.default_rng(0)
  train_combos = {(o.color, o.shape) for _ in range(2000) for o in shapes.sample_spec(rng).objects}
  assert not train_combos & shapes.HELDOUT
  assert train_combos == set(shapes.TRAIN_COMBOS)
  for _ in range(200):
    spec = shapes.sample_heldout_spec(rng)
    assert {(o.color, o.shape) for o in spec.objects} & shapes.HELDOUT


def test_built_dataset_splits():
  c = small_config()
  path = builtin.shapes_dir(c)
  train = builders.open_split(path, "train")
  assert len(train) == 200
  for split in ("validation", "test", "heldout"):
    assert len(builders.open_split(path, split)) == 40
  for i in range(0, 200, 7):
    ex = train[i]
    spec = shapes.Spec.from_json(ex["spec"].decode())
    assert ex["caption"].decode() == shapes.caption(spec)
    assert not {(o.color, o.shape) for o in spec.objects} & shapes.HELDOUT
    np.testing.assert_array_equal(ex["image"], shapes.render(spec))
  held = builders.open_split(path, "heldout")
  assert all({(o.color, o.shape) for o in shapes.Spec.from_json(held[i]["spec"].decode()).objects} & shapes.HELDOUT
             for i in range(len(held)))


def _kinds(path: str, split: str) -> dict[str, int]:
  ds = builders.open_split(path, split)
  kinds = [shapes.Spec.from_json(ds[i]["spec"].decode()).kind for i in range(len(ds))]
  return {k: kinds.count(k) for k in shapes.KINDS}


def test_kind_weights_reweigh_the_train_split_only_in_a_dataset_of_their_own(tmp_path):
  c = small_config(str(tmp_path))
  c.data.shapes_train_size, c.data.shapes_eval_size = 400, 60
  even = builtin.shapes_dir(c)
  c.data.shapes_kind_weights = (1, 1, 2)
  weighted = builtin.shapes_dir(c)
  assert weighted.rstrip("/").split("/")[-1] == "n400_e60_k0.25-0.25-0.5_r2" and weighted != even
  c.data.shapes_kind_weights = (2.0, 2.0, 2.0)   # even in any unit: the default dataset, not a new one
  assert builtin.shapes_dir(c) == even
  n = _kinds(weighted, "train")
  assert n["relation"] > 0.4 * 400 and max(n["single"], n["count"]) < 0.33 * 400, n
  assert _kinds(weighted, "test") == _kinds(even, "test")     # evaluation splits stay even
  c.data.shapes_kind_weights = (1, 0, 0)
  assert _kinds(builtin.shapes_dir(c), "train") == {"single": 400, "count": 0, "relation": 0}
  for bad in ((1, 1), (1, -1, 1), (0, 0, 0)):
    c.data.shapes_kind_weights = bad
    with pytest.raises(ValueError, match="shapes_kind_weights must be 3 non-negative weights"):
      builtin.shapes_dir(c)
