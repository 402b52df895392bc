"""The shapes-edit world: a source scene, an instruction, and the target scene it asks for.

Four kinds of edit, each over scenes of the shapes world (tfx.data.shapes):
  recolour  "make the red circle blue"                      a one-object or relation scene
  move      "move the red square to the left of the blue triangle"   a relation scene
  add       "add a green triangle"                          a one-object scene -> two objects
  remove    "remove the yellow square"                      a relation scene -> one object
Objects are always named by colour and shape, and the scenes hold distinct
colour-shape pairs, so an instruction names exactly one object. Every target is a
scene of the shapes grammar (its caption is checkable by shapes.score), and
`Edit.kept` lists the target objects that must stay where they were in the source
(the per-object check of tfx.eval.edits).
"""
import dataclasses
import json

import numpy as np

from tfx.data import shapes

KINDS = ("recolour", "move", "add", "remove")
_INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}
_MARGIN = 6.0   # placed relations hold by this many pixels, as in shapes.sample_spec


@dataclasses.dataclass(frozen=True)
class Edit:
  kind: str
  source: shapes.Spec
  instruction: str
  target: shapes.Spec
  kept: tuple[int, ...]   # indices into target.objects of objects at their source place

  def to_json(self) -> str:
    return json.dumps({"kind": self.kind, "instruction": self.instruction, "kept": list(self.kept),
                       "source": json.loads(self.source.to_json()), "target": json.loads(self.target.to_json())})

  @classmethod
  def from_json(cls, text: str) -> "Edit":
    d = json.loads(text)
    return cls(d["kind"], shapes.Spec.from_json(json.dumps(d["source"])), d["instruction"],
               shapes.Spec.from_json(json.dumps(d["target"])), tuple(d["kept"]))

  def objects(self) -> list[shapes.Obj]:
    return list(self.source.objects) + list(self.target.objects)


def _combo(o: shapes.Obj) -> tuple[str, str]:
  return o.color, o.shape


def _recolour(rng, combos) -> Edit | None:
  source = shapes.sample_spec(rng, combos, kind=("single", "relation")[rng.integers(2)])
  i = int(rng.integers(len(source.objects)))
  o = source.objects[i]
  taken = {_combo(p) for p in source.objects}
  colors = [c for c, s in combos if s == o.shape and (c, s) not in taken]
  if not colors:
    return None
  new = dataclasses.replace(o, color=colors[rng.integers(len(colors))])
  objects = tuple(new if j == i else p for j, p in enumerate(source.objects))
  target = dataclasses.replace(source, objects=objects)
  return Edit("recolour", source, f"make the {o.color} {o.shape} {new.color}", target,
              tuple(range(len(objects))))


def _move(rng, combos) -> Edit | None:
  source = shapes.sample_spec(rng, combos, kind="relation")
  m = int(rng.integers(2))
  mover, ref = source.objects[m], source.objects[1 - m]
  now = source.relation if m == 0 else _INVERSE[source.relation]
  relation = [r for r in shapes.RELATIONS if r != now][rng.integers(len(shapes.RELATIONS) - 1)]
  r = mover.size / 2 + 2
  for _ in range(200):
    moved = dataclasses.replace(mover, cx=float(rng.uniform(r, shapes.SIZE - r)),
                                cy=float(rng.uniform(r, shapes.SIZE - r)))
    if shapes._boxes_apart(moved, ref) and shapes.relation_holds(moved, ref, relation, _MARGIN):
      return Edit("move", source, f"move the {mover.color} {mover.shape} {relation} the {ref.color} {ref.shape}",
                  shapes.Spec("relation", (moved, ref), relation), (1,))
  return None


def _add(rng, combos) -> Edit | None:
  source = shapes.sample_spec(rng, combos, kind="single")
  a = source.objects[0]
  others = [cs for cs in combos if cs != _combo(a)]
  c, s = others[rng.integers(len(others))]
  relation = shapes.RELATIONS[rng.integers(len(shapes.RELATIONS))]
  for _ in range(200):
    b = shapes._place(rng, c, s, "relation")
    if shapes._boxes_apart(a, b) and shapes.relation_holds(a, b, relation, _MARGIN):
      return Edit("add", source, f"add {shapes._a(c, s)}", shapes.Spec("relation", (a, b), relation), (0,))
  return None


def _remove(rng, combos) -> Edit:
  source = shapes.sample_spec(rng, combos, kind="relation")
  i = int(rng.integers(2))
  gone, stays = source.objects[i], source.objects[1 - i]
  return Edit("remove", source, f"remove the {gone.color} {gone.shape}", shapes.Spec("single", (stays,)), (0,))


_MAKERS = {"recolour": _recolour, "move": _move, "add": _add, "remove": _remove}


def sample_edit(rng: np.random.Generator, kind: str, combos=shapes.TRAIN_COMBOS) -> Edit:
  """A random edit of `kind` whose source and target objects use only `combos`."""
  if kind not in _MAKERS:
    raise ValueError(f"edit kind must be one of {KINDS}, got {kind!r}")
  for _ in range(1000):
    edit = _MAKERS[kind](rng, combos)
    if edit is not None:
      return edit
  raise RuntimeError(f"could not make a {kind} edit")


def sample_heldout_edit(rng: np.random.Generator, kind: str) -> Edit:
  """An edit in which some source or target object is a held-out colour-shape combination."""
  for _ in range(1000):
    edit = sample_edit(rng, kind, shapes.COMBOS)
    if any(_combo(o) in shapes.HELDOUT for o in edit.objects()):
      return edit
  raise RuntimeError(f"could not make a held-out {kind} edit")
