"""A second shapes renderer, for evaluation only: the same scene spec drawn another way.

Never used for training. A model that learned shapes (not tfx.data.shapes.render)
should caption these images as well as the test split's. Scenes are shapes.Spec
with shapes.caption, so shapes.score applies unchanged. What differs from the
training world (all within the spec: 64x64 on white, the six palette colours,
circles / squares / upward triangles, >= 12 px in multi-object scenes, 14-30 px alone):
  drawing    inside tests of each shape evaluated at 8x8 points per pixel, averaged
             (exact coverage up to 1/64), composited in numpy; no PIL drawing calls
  triangles  equilateral: base `size`, height size * sqrt(3) / 2 (training: height = base)
  sizes      continuous and log-uniform (training: uniform integers); 12-22 px in
             count and relation scenes (training 12-18 / 12-20)
  placement  down to 1 px from the border (training 2 px)
"""
import numpy as np

from tfx.data import shapes

SPLIT = "alt"
_SEED = 9876            # its scenes are a fixed artifact, like the dataset's
_POINTS = 8             # inside tests per pixel along each axis
_EDGE = 1.0             # least empty pixels between an object's box and the border
_GAP = 3.0              # least empty pixels between two objects' boxes (same as training: the
                        # scorer's blur joins closer same-colour objects into one component)
_MARGIN = 6.0           # relation margin between centres, as the scene spec has it
_SINGLE, _MULTI = (14.0, 30.0), (12.0, 22.0)
_TRI_HEIGHT = np.sqrt(3) / 2


def _height(shape: str, size: float) -> float:
  return size * _TRI_HEIGHT if shape == "triangle" else size


def _place(rng: np.random.Generator, color: str, shape: str, lo_hi: tuple[float, float]) -> shapes.Obj:
  lo, hi = np.log(lo_hi[0]), np.log(lo_hi[1])
  size = float(np.exp(rng.uniform(lo, hi)))
  rx, ry = size / 2 + _EDGE, _height(shape, size) / 2 + _EDGE
  return shapes.Obj(color, shape, float(rng.uniform(rx, shapes.SIZE - rx)), float(rng.uniform(ry, shapes.SIZE - ry)),
                    size)


def _apart(a: shapes.Obj, b: shapes.Obj) -> bool:
  dx = abs(a.cx - b.cx) >= (a.size + b.size) / 2 + _GAP
  dy = abs(a.cy - b.cy) >= (_height(a.shape, a.size) + _height(b.shape, b.size)) / 2 + _GAP
  return dx or dy


def sample_spec(rng: np.random.Generator, kind: str, combos=shapes.TRAIN_COMBOS,
                first: tuple[str, str] | None = None) -> shapes.Spec:
  """A `kind` scene over `combos`; `first` fixes the first object's combination (held-out scenes)."""
  combos = list(combos)
  pick = lambda: combos[rng.integers(len(combos))]
  for _ in range(1000):
    c, s = first or pick()
    if kind == "single":
      return shapes.Spec(kind, (_place(rng, c, s, _SINGLE),))
    if kind == "count":
      objs = []
      for _ in range(200 * (n := int(rng.integers(2, 4)))):
        o = _place(rng, c, s, _MULTI)
        if all(_apart(o, p) for p in objs):
          objs.append(o)
          if len(objs) == n:
            return shapes.Spec(kind, tuple(objs))
      continue
    other = pick()
    if other == (c, s):
      continue
    relation = shapes.RELATIONS[rng.integers(len(shapes.RELATIONS))]
    a, b = _place(rng, c, s, _MULTI), _place(rng, *other, _MULTI)
    if _apart(a, b) and shapes.relation_holds(a, b, relation, _MARGIN):
      return shapes.Spec(kind, (a, b), relation)
  raise RuntimeError(f"could not place an alt {kind} scene")


def _inside(o: shapes.Obj, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Whether the points (x, y) (64 px canvas coordinates) lie inside the object."""
  dx, dy = x - o.cx, y - o.cy
  half = o.size / 2
  if o.shape == "circle":
    return dx * dx + dy * dy <= half * half
  if o.shape == "square":
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)
  h = _height("triangle", o.size)
  top, bottom = -h / 2, h / 2
  # below the apex, above the base, inside both slanted edges (|dx| shrinks linearly to 0 at the apex)
  return (dy <= bottom) & (np.abs(dx) <= half * (dy - top) / h)


def render(spec: shapes.Spec) -> np.ndarray:
  """uint8 [64, 64, 3]: each pixel the mean colour at its 8x8 sample points, later objects on top."""
  n = shapes.SIZE * _POINTS
  coords = (np.arange(n) + 0.5) / _POINTS
  y_SS, x_SS = np.meshgrid(coords, coords, indexing="ij")
  canvas_SS3 = np.empty((n, n, 3), np.float32)
  canvas_SS3[:] = shapes.WHITE
  for o in spec.objects:
    canvas_SS3[_inside(o, x_SS, y_SS)] = shapes.COLORS[o.color]
  pixels = canvas_SS3.reshape(shapes.SIZE, _POINTS, shapes.SIZE, _POINTS, 3).mean((1, 3))
  return np.round(pixels).astype(np.uint8)


def scenes(num: int, *, held_out: bool = False) -> list[shapes.Spec]:
  """`num` alt scenes, kinds in turn (single, count, relation, ...); scene i depends only on (held_out, i).

  Held-out scenes put one of the held-out colour-shape combinations first; the
  other object of a relation is any other combination, as in the dataset's heldout split.
  """
  held = sorted(shapes.HELDOUT)
  out = []
  for i in range(num):
    rng = np.random.default_rng([_SEED, int(held_out), i])
    kind = shapes.KINDS[i % len(shapes.KINDS)]
    if held_out:
      first = held[rng.integers(len(held))]
      out.append(sample_spec(rng, kind, shapes.COMBOS, first=first))
    else:
      out.append(sample_spec(rng, kind))
  return out
