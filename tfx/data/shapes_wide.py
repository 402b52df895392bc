"""A wider shapes world for training (`data.image_text = "shapes_wide"`): the spec with more of its freedom used.

Same grammar, palette, held-out combinations and scorer as tfx.data.shapes, whose
scenes all come from one renderer's habits (integer sizes, 2 px from the border,
isosceles triangles, one 4x box-filtered drawing, exact palette colours). Here each
of those varies within the spec, so a model has to learn the shapes, not the renderer:
  sizes       continuous; 14-30 px alone (as before), 12-24 px with others (12-18 / 12-20)
  positions   down to 0.5 px from the border (2 px)
  triangles   upward as the spec has them, height 0.8-1.0 of the base (1.0)
  drawing     at 2x, 3x, 4x or 8x, resampled to 64 px by a box, bilinear or Lanczos
              filter; or at 64 px with no anti-aliasing (one in five scenes)
  colour      each fill off its palette colour by up to +-8 per channel
  outline     half the objects get a 1 px outline of their fill darkened by up to 8%
The jittered colours stay inside the scorer's palette tolerance (tests check every extreme).
"""
import numpy as np
from PIL import Image, ImageDraw

from tfx.data import shapes

COLOR_JITTER = 8           # +- per channel
OUTLINE_DARKEN = 0.08      # outline colour = fill * (1 - up to this)
TRIANGLE_HEIGHT = (0.8, 1.0)
_SIZES = {"single": (14.0, 30.0), "count": (12.0, 22.0), "relation": (12.0, 24.0)}
_EDGE = 0.5
_SCALES = (2, 3, 4, 8)
_FILTERS = (Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS)
_ALIASED = 0.2             # share of scenes drawn straight at 64 px
_OUTLINED = 0.5            # share of objects with an outline


def place(rng: np.random.Generator, color: str, shape: str, kind: str) -> shapes.Obj:
  """A continuous size for a `kind` scene, down to 0.5 px from the border (shapes.Place)."""
  size = float(rng.uniform(*_SIZES[kind]))
  r = size / 2 + _EDGE
  return shapes.Obj(color, shape, float(rng.uniform(r, shapes.SIZE - r)), float(rng.uniform(r, shapes.SIZE - r)),
                    size)


def sample_spec(rng: np.random.Generator, kind: str | None = None) -> shapes.Spec:
  return shapes.sample_spec(rng, kind=kind, place=place)


def sample_heldout_spec(rng: np.random.Generator) -> shapes.Spec:
  return shapes.sample_heldout_spec(rng, place=place)


def jitter_color(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
  rgb = np.array(shapes.COLORS[name]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
  return tuple(int(v) for v in np.clip(rgb, 0, 255))


def render(spec: shapes.Spec, rng: np.random.Generator) -> np.ndarray:
  """uint8 [64, 64, 3]: the scene drawn in a style drawn from `rng` (see the module docstring)."""
  aliased = rng.random() < _ALIASED
  scale = 1 if aliased else int(rng.choice(_SCALES))
  resample = _FILTERS[rng.integers(len(_FILTERS))]
  big = Image.new("RGB", (shapes.SIZE * scale, shapes.SIZE * scale), shapes.WHITE)
  draw = ImageDraw.Draw(big)
  for o in spec.objects:
    fill = jitter_color(rng, o.color)
    outline = None
    if rng.random() < _OUTLINED:
      outline = tuple(int(v * (1 - rng.uniform(0, OUTLINE_DARKEN))) for v in fill)
    half_w = o.size / 2
    half_h = half_w * (rng.uniform(*TRIANGLE_HEIGHT) if o.shape == "triangle" else 1.0)
    x0, x1 = (o.cx - half_w) * scale, (o.cx + half_w) * scale
    y0, y1 = (o.cy - half_h) * scale, (o.cy + half_h) * scale
    style = dict(fill=fill, outline=outline, width=scale)
    if o.shape == "circle":
      draw.ellipse((x0, y0, x1, y1), **style)
    elif o.shape == "square":
      draw.rectangle((x0, y0, x1, y1), **style)
    else:
      draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], **style)
  if scale == 1:
    return np.asarray(big)
  return np.asarray(big.resize((shapes.SIZE, shapes.SIZE), resample))
