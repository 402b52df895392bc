"""The evaluation-only shapes renderer: same scene spec and scorer, another drawing."""
import numpy as np
import pytest

from tfx.data import shapes, shapes_alt
from tfx.eval import eval_set
from data_testing import small_config


@pytest.fixture(scope="module")
def scenes():
  specs = shapes_alt.scenes(150) + shapes_alt.scenes(60, held_out=True)
  return specs, [shapes_alt.render(s) for s in specs], [shapes.caption(s) for s in specs]


def test_scorer_passes_every_clean_alt_scene(scenes):
  _, images, captions = scenes
  assert all(shapes.score(im, c)["passed"] for im, c in zip(images, captions))


def test_scorer_rejects_wrong_captions(scenes):
  _, images, captions = scenes
  passed = []
  for i, image in enumerate(images):
    j = (i + 1) % len(captions)
    while shapes.parse_caption(captions[j]).canonical() == shapes.parse_caption(captions[i]).canonical():
      j = (j + 1) % len(captions)
    passed.append(shapes.score(image, captions[j])["passed"])
  assert np.mean(passed) < 0.02


def test_scenes_follow_the_spec_and_differ_from_training(scenes):
  specs, _, _ = scenes
  assert [s.kind for s in specs[:6]] == ["single", "count", "relation"] * 2
  for s in specs[:150]:
    assert not {(o.color, o.shape) for o in s.objects} & shapes.HELDOUT
    lo = 14 if s.kind == "single" else 12
    assert all(lo <= o.size <= (30 if s.kind == "single" else 22) for o in s.objects)
  assert all({(o.color, o.shape) for o in s.objects} & shapes.HELDOUT for s in specs[150:])
  assert {len(s.objects) for s in specs if s.kind == "count"} == {2, 3}
  # continuous sizes (training draws integers) and a different drawing of the same scene
  assert any(o.size != round(o.size) for s in specs for o in s.objects)
  assert not np.array_equal(shapes_alt.render(specs[0]), shapes.render(specs[0]))


def test_deterministic_for_a_seed():
  a, b = shapes_alt.scenes(9), shapes_alt.scenes(9)
  assert a == b and a != shapes_alt.scenes(9, held_out=True)
  np.testing.assert_array_equal(shapes_alt.render(a[2]), shapes_alt.render(b[2]))


@pytest.mark.parametrize("shape,area", [("circle", np.pi * 10 ** 2), ("square", 20.0 ** 2),
                                        ("triangle", 20 * 20 * np.sqrt(3) / 2 / 2)])
def test_ink_equals_the_analytic_area(shape, area):
  """Box-filtered coverage: the ink summed over pixels is the shape's exact area."""
  spec = shapes.Spec("single", (shapes.Obj("blue", shape, 31.3, 30.6, 20.0),))
  image = shapes_alt.render(spec).astype(np.float64)
  white, blue = np.float64(shapes.WHITE), np.float64(shapes.COLORS["blue"])
  ink = ((white - image) @ (white - blue) / ((white - blue) ** 2).sum()).sum()
  assert ink == pytest.approx(area, rel=0.01)


def test_eval_set_alt_pairs():
  pairs = eval_set.load_eval_pairs(small_config(), eval_set.ALT_SPLIT, 6, 3)
  assert [p.kind for p in pairs.prompts] == ["single", "count", "relation"] * 3
  assert [p.held_out for p in pairs.prompts] == [False] * 6 + [True] * 3
  assert pairs.has_kinds and pairs.images.shape == (9, 64, 64, 3)
  np.testing.assert_array_equal(pairs.images[4], shapes_alt.render(shapes_alt.scenes(6)[4]))
