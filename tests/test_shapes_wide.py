"""The wider shapes world (data.image_text = "shapes_wide"): deterministic, scorer-clean, really varied."""
import itertools

import numpy as np
import pytest

from tfx.data import builders, builtin, shapes, shapes_wide
from data_testing import small_config


def _example(seed: int, i: int, held_out: bool = False):
  rng = np.random.default_rng([seed, i])
  spec = shapes_wide.sample_heldout_spec(rng) if held_out else shapes_wide.sample_spec(rng)
  return spec, shapes_wide.render(spec, rng)


@pytest.fixture(scope="module")
def scenes():
  return [_example(3, i) for i in range(200)] + [_example(4, i, held_out=True) for i in range(60)]


def test_scorer_passes_every_wide_scene_and_rejects_wrong_captions(scenes):
  captions = [shapes.caption(s) for s, _ in scenes]
  assert all(shapes.score(im, c)["passed"] for (_, im), c in zip(scenes, captions))
  wrong = [shapes.score(im, captions[(i + 7) % len(captions)])["passed"] for i, (_, im) in enumerate(scenes)
           if shapes.parse_caption(captions[(i + 7) % len(captions)]).canonical()
           != shapes.parse_caption(captions[i]).canonical()]
  assert np.mean(wrong) < 0.02


def test_every_jittered_colour_stays_its_palette_colour():
  j, d = shapes_wide.COLOR_JITTER, shapes_wide.OUTLINE_DARKEN
  for index, (name, rgb) in enumerate(shapes.COLORS.items()):
    for offsets in itertools.product((-j, j), repeat=3):
      for darken in (0.0, d):
        color = np.clip(np.array(rgb) + offsets, 0, 255) * (1 - darken)
        flat = np.broadcast_to(color.astype(np.uint8), (64, 64, 3)).copy()
        assert (shapes.classify_pixels(flat) == index).all(), (name, offsets, darken)


def test_the_world_is_wider_than_the_default(scenes):
  specs = [s for s, _ in scenes[:200]]
  assert not {(o.color, o.shape) for s in specs for o in s.objects} & shapes.HELDOUT
  assert all({(o.color, o.shape) for o in s.objects} & shapes.HELDOUT for s, _ in scenes[200:])
  sizes = [o.size for s in specs if s.kind != "single" for o in s.objects]
  assert max(sizes) > shapes.SIZES["relation"][1] and any(x != round(x) for x in sizes)
  edge = min(min(o.cx, o.cy, 64 - o.cx, 64 - o.cy) - o.size / 2 for s in specs for o in s.objects)
  assert 0.5 <= edge < 2   # the default keeps 2 px clear
  colours = [len(np.unique(im.reshape(-1, 3), axis=0)) for _, im in scenes]
  assert min(colours) <= 8 and max(colours) > 40   # aliased scenes (fills, outlines, white) and anti-aliased ones
  fills = {tuple(im[int(o.cy), int(o.cx)]) for s, im in scenes for o in s.objects if o.shape != "triangle"}
  assert len(fills) > 30   # jittered fills, not six palette colours


def test_deterministic_for_a_seed():
  a, b = _example(3, 5), _example(3, 5)
  assert a[0] == b[0]
  np.testing.assert_array_equal(a[1], b[1])
  assert _example(3, 6)[0] != a[0]


def test_built_dataset():
  c = small_config()
  path = builtin.resolve(c, builtin.SHAPES_WIDE)
  assert path.rstrip("/").split("/")[-2:] == ["shapes_wide", "n200_e40_r2"]
  assert builtin.resolve(c, builtin.SHAPES) != path
  train = builders.open_split(path, "train")
  assert len(train) == 200 and len(builders.open_split(path, "heldout")) == 40
  expected = {}   # builtin's seed, the train split's index, the example's index
  for i in range(200):
    rng = np.random.default_rng([1234, 0, i])
    spec = shapes_wide.sample_spec(rng)
    expected[spec.to_json()] = (shapes.caption(spec), shapes_wide.render(spec, rng))
  for i in range(0, 200, 9):   # tfds orders records by key hash, so match them by scene
    ex = train[i]
    caption, image = expected[ex["spec"].decode()]
    assert ex["caption"].decode() == caption
    np.testing.assert_array_equal(ex["image"], image)
