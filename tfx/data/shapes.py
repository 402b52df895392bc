"""The shapes world: scene specs, their captions, a renderer and an exact pixel scorer.

Images are 64x64 RGB on white with 1-3 anti-aliased circles, squares or upward
triangles in six palette colours. Captions come in three kinds:
  single    "a red circle", "an orange triangle"
  count     "two blue squares", "three green circles"
  relation  "a red circle to the left of a blue square"
`score(image, caption)` re-derives the scene from pixels (palette classification,
connected components, geometry) and checks it against the caption.
"""
import dataclasses
import json
import re
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 64
WHITE = (255, 255, 255)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")
KINDS = ("single", "count", "relation")
NUMBERS = {1: "one", 2: "two", 3: "three"}
# Colour-shape combinations that never appear in the train split (compositional test).
HELDOUT = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square")})
COMBOS = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_COMBOS = tuple(cs for cs in COMBOS if cs not in HELDOUT)

_SUPERSAMPLE = 4
_MIN_AREA = 16          # components smaller than this (in 64x64 pixels) are noise
_GAP = 3                # minimum empty pixels between two objects' boxes


@dataclasses.dataclass(frozen=True)
class Obj:
  color: str
  shape: str
  cx: float     # centre, pixels of the 64x64 canvas
  cy: float
  size: float   # side of the bounding box


@dataclasses.dataclass(frozen=True)
class Spec:
  kind: str
  objects: tuple[Obj, ...]
  relation: str = ""   # for kind == "relation": objects[0] <relation> objects[1]

  def to_json(self) -> str:
    return json.dumps({"kind": self.kind, "relation": self.relation,
                       "objects": [dataclasses.asdict(o) for o in self.objects]})

  @classmethod
  def from_json(cls, text: str) -> "Spec":
    d = json.loads(text)
    return cls(d["kind"], tuple(Obj(**o) for o in d["objects"]), d["relation"])


# -- captions -----------------------------------------------------------------

def _a(color: str, shape: str) -> str:
  return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def caption(spec: Spec) -> str:
  """The caption of a scene, lower case, no final period."""
  o = spec.objects
  if spec.kind == "single":
    return _a(o[0].color, o[0].shape)
  if spec.kind == "count":
    return f"{NUMBERS[len(o)]} {o[0].color} {o[0].shape}s"
  return f"{_a(o[0].color, o[0].shape)} {spec.relation} {_a(o[1].color, o[1].shape)}"


@dataclasses.dataclass(frozen=True)
class Query:
  """What a caption asks for: (count, colour, shape) groups and an optional relation."""
  kind: str
  groups: tuple[tuple[int, str, str], ...]
  relation: str = ""

  def canonical(self) -> tuple:
    """Equal for captions that describe the same scenes ("A left of B" == "B right of A")."""
    if self.kind != "relation":
      return (self.groups,)
    flip = {"to the right of": "to the left of", "below": "above"}
    if self.relation in flip:
      return (self.groups[::-1], flip[self.relation])
    return (self.groups, self.relation)


_COL = "|".join(COLORS)
_SHP = "|".join(SHAPES)
_REL = "|".join(RELATIONS)
_ONE = rf"an? ({_COL}) ({_SHP})"
_SINGLE_RE = re.compile(rf"^{_ONE}$")
_COUNT_RE = re.compile(rf"^(one|two|three) ({_COL}) ({_SHP})s?$")
_RELATION_RE = re.compile(rf"^{_ONE} ({_REL}) {_ONE}$")


def parse_caption(text: str) -> Query:
  """Parses a caption of the grammar; raises ValueError on anything else."""
  t = " ".join(text.strip().lower().rstrip(".").split())
  if m := _SINGLE_RE.match(t):
    return Query("single", ((1, m[1], m[2]),))
  if m := _COUNT_RE.match(t):
    n = {v: k for k, v in NUMBERS.items()}[m[1]]
    return Query("count", ((n, m[2], m[3]),))
  if m := _RELATION_RE.match(t):
    return Query("relation", ((1, m[1], m[2]), (1, m[4], m[5])), m[3])
  raise ValueError(f"caption is not in the shapes grammar: {text!r}")


# -- sampling scenes ------------------------------------------------------------

def _boxes_apart(a: Obj, b: Obj) -> bool:
  half = (a.size + b.size) / 2 + _GAP
  return abs(a.cx - b.cx) >= half or abs(a.cy - b.cy) >= half


def relation_holds(a: Obj, b: Obj, relation: str, margin: float = 0.0) -> bool:
  """Centre geometry: the main axis difference dominates the other by `margin`."""
  dx, dy = b.cx - a.cx, b.cy - a.cy   # from a to b; image y grows downward
  main, other = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                 "above": (dy, dx), "below": (-dy, dx)}[relation]
  return main > abs(other) + margin


SIZES = {"single": (14, 30), "count": (12, 18), "relation": (12, 20)}   # px, per scene kind


def _place(rng: np.random.Generator, color: str, shape: str, kind: str) -> Obj:
  """An integer size for a `kind` scene, 2 px clear of the border."""
  lo, hi = SIZES[kind]
  size = float(rng.integers(lo, hi + 1))
  r = size / 2 + 2
  return Obj(color, shape, float(rng.uniform(r, SIZE - r)), float(rng.uniform(r, SIZE - r)), size)


Place = Callable[[np.random.Generator, str, str, str], Obj]   # (rng, colour, shape, kind) -> an object


def sample_spec(rng: np.random.Generator, combos=TRAIN_COMBOS, kind: str | None = None,
                place: Place = _place) -> Spec:
  """A random scene whose objects use only `combos` (colour, shape) pairs; `place` draws each object."""
  kind = kind or KINDS[rng.integers(len(KINDS))]
  combos = list(combos)
  for _ in range(1000):
    if kind == "single":
      c, s = combos[rng.integers(len(combos))]
      return Spec(kind, (place(rng, c, s, kind),))
    if kind == "count":
      c, s = combos[rng.integers(len(combos))]
      n = int(rng.integers(2, 4))
      objs = []
      for _ in range(200):
        o = place(rng, c, s, kind)
        if all(_boxes_apart(o, p) for p in objs):
          objs.append(o)
          if len(objs) == n:
            return Spec(kind, tuple(objs))
      continue
    i, j = rng.choice(len(combos), size=2, replace=False)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    a = place(rng, *combos[i], kind)
    b = place(rng, *combos[j], kind)
    if _boxes_apart(a, b) and relation_holds(a, b, relation, margin=6.0):
      return Spec(kind, (a, b), relation)
  raise RuntimeError(f"could not place a {kind} scene")


def sample_heldout_spec(rng: np.random.Generator, place: Place = _place) -> Spec:
  """A scene in which at least one object is a held-out colour-shape combination."""
  held = sorted(HELDOUT)
  spec = sample_spec(rng, held, kind=None, place=place)
  if spec.kind != "relation":
    return spec
  # Pair a held-out object with any other combination.
  other = [cs for cs in COMBOS if cs != (spec.objects[0].color, spec.objects[0].shape)]
  for _ in range(1000):
    c, s = other[rng.integers(len(other))]
    b = place(rng, c, s, "relation")
    if _boxes_apart(spec.objects[0], b) and relation_holds(spec.objects[0], b, spec.relation, 6.0):
      return Spec("relation", (spec.objects[0], b), spec.relation)
  raise RuntimeError("could not place a held-out relation scene")


# -- rendering ------------------------------------------------------------------

def render(spec: Spec, size: int = SIZE) -> np.ndarray:
  """Draws the scene anti-aliased (supersampled box filter) as uint8 [size, size, 3]."""
  s = _SUPERSAMPLE * size / SIZE
  big = Image.new("RGB", (round(SIZE * s), round(SIZE * s)), WHITE)
  draw = ImageDraw.Draw(big)
  for o in spec.objects:
    x0, y0 = (o.cx - o.size / 2) * s, (o.cy - o.size / 2) * s
    x1, y1 = (o.cx + o.size / 2) * s, (o.cy + o.size / 2) * s
    fill = COLORS[o.color]
    if o.shape == "circle":
      draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "square":
      draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
      draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
  return np.asarray(big.resize((size, size), Image.Resampling.BOX))


# -- scoring --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Detection:
  color: str
  shape: str     # circle / square / triangle / "other"
  cx: float
  cy: float
  area: int


_NAMES = list(COLORS)
_INK_RGB = np.array([COLORS[c] for c in _NAMES], np.float32)          # [C, 3]
_AXIS = np.float32(WHITE) - _INK_RGB                                   # white -> colour


def _to_64(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"scorer needs a square RGB image [S, S, 3], got {image.shape}")
  if image.dtype != np.uint8:
    raise ValueError(f"scorer needs uint8 pixels, got {image.dtype}")
  if image.shape[0] == SIZE:
    return image.astype(np.float32)
  resample = Image.Resampling.BILINEAR if image.shape[0] < SIZE else Image.Resampling.BOX
  return np.asarray(Image.fromarray(image).resize((SIZE, SIZE), resample), np.float32)


def classify_pixels(image: np.ndarray) -> np.ndarray:
  """Palette label per pixel: -1 background/unknown, else the index into COLORS.

  After a slight blur, a pixel is modelled as a blend of white and one palette
  colour; it takes the colour whose white->colour line it lies closest to, if it
  is at least half ink.
  """
  x_HW3 = ndimage.gaussian_filter(_to_64(image), sigma=(0.7, 0.7, 0))   # tames speckle in generated images
  d_HW3 = np.float32(WHITE) - x_HW3
  alpha_HWC = np.clip(d_HW3 @ _AXIS.T / (_AXIS ** 2).sum(-1), 0.0, 1.0)
  resid_HWC = np.linalg.norm(d_HW3[:, :, None, :] - alpha_HWC[..., None] * _AXIS, axis=-1)
  best_HW = resid_HWC.argmin(-1)
  alpha_HW = np.take_along_axis(alpha_HWC, best_HW[..., None], -1)[..., 0]
  resid_HW = np.take_along_axis(resid_HWC, best_HW[..., None], -1)[..., 0]
  return np.where((alpha_HW >= 0.5) & (resid_HW < 60.0), best_HW, -1)


def _shape_of(mask_HW: np.ndarray) -> str:
  """Square / circle / triangle from how much of its box the blob fills, and where."""
  ys, xs = np.nonzero(mask_HW)
  h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
  if max(h, w) > 2 * min(h, w):
    return "other"
  fill = len(ys) / (h * w)
  third = max(h // 3, 1)
  top = mask_HW[ys.min():ys.min() + third].sum()
  bottom = mask_HW[ys.max() + 1 - third:ys.max() + 1].sum()
  if top < 0.55 * bottom and 0.35 <= fill < 0.8:
    return "triangle"
  if fill >= 0.88:
    return "square"
  if fill >= 0.66 and top >= 0.55 * bottom:
    return "circle"
  return "other"


def detect(image: np.ndarray) -> list[Detection]:
  """Objects in an image: one per connected region (holes filled) of one palette colour."""
  labels_HW = classify_pixels(image)
  found = []
  for ci, name in enumerate(_NAMES):
    comps_HW, n = ndimage.label(ndimage.binary_fill_holes(labels_HW == ci))
    for k in range(1, n + 1):
      mask_HW = comps_HW == k
      area = int(mask_HW.sum())
      if area < _MIN_AREA:
        continue
      ys, xs = np.nonzero(mask_HW)
      found.append(Detection(name, _shape_of(mask_HW), float(xs.mean()), float(ys.mean()), area))
  return found


def score(image: np.ndarray, caption_text: str) -> dict:
  """Checks a square uint8 RGB image (any size) against a caption of the grammar.

  Returns dict(kind, color, shape, count, position, passed) of Python bools
  (kind a str); `position` is True for captions that state no relation.
  """
  q = parse_caption(caption_text)
  found = detect(image)
  wanted_colors = {c for _, c, _ in q.groups}
  color_ok = {d.color for d in found} == wanted_colors
  shape_ok = all(any(d.color == c and d.shape == s for d in found) for _, c, s in q.groups) and all(
      d.shape in {s for _, c, s in q.groups if c == d.color} for d in found if d.color in wanted_colors)
  count_ok = len(found) == sum(n for n, _, _ in q.groups) and all(
      sum(d.color == c and d.shape == s for d in found) == n for n, c, s in q.groups)
  position_ok = True
  if q.kind == "relation":
    a = [d for d in found if (d.color, d.shape) == q.groups[0][1:]]
    b = [d for d in found if (d.color, d.shape) == q.groups[1][1:]]
    position_ok = len(a) == 1 and len(b) == 1 and relation_holds(a[0], b[0], q.relation)
  return dict(kind=q.kind, color=bool(color_ok), shape=bool(shape_ok), count=bool(count_ok),
              position=bool(position_ok), passed=bool(color_ok and shape_ok and count_ok and position_ok))


def grammar_captions(rng: np.random.Generator, n: int) -> list[str]:
  """`n` random captions over every colour-shape combination (tokenizer training text)."""
  return [caption(sample_spec(rng, COMBOS)) for _ in range(n)]
