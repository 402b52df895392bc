"""Image editing: the shapes-edit world and builder, its exact scorer, fine-tuning with
init_from, `tfx.sample --edit` and `tfx.evaluate --edits`, on a tiny model."""
import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

import data_testing
import train_helpers
from tfx import checkpoint as ckpt_lib, evaluate, record, sample, trainer
from tfx.data import builders, builtin, examples, shapes, shapes_edit
from tfx.eval import edits


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  with train_helpers.persistent_compile_cache(tmp_path_factory.mktemp("jax_cache")):
    yield


def _obj(o: shapes.Obj) -> tuple:
  return o.color, o.shape, o.cx, o.cy, o.size


def _check_matches_instruction(e: shapes_edit.Edit) -> None:
  """The target is the source changed exactly as the instruction says (an independent reading)."""
  words = e.instruction.split()
  src, tgt = [_obj(o) for o in e.source.objects], [_obj(o) for o in e.target.objects]
  if e.kind == "recolour":   # make the C S C2
    assert words[:2] == ["make", "the"] and len(words) == 5
    c, s, c2 = words[2:]
    i = next(i for i, o in enumerate(src) if o[:2] == (c, s))
    assert tgt == [(c2,) + o[1:] if j == i else o for j, o in enumerate(src)] and c2 != c
    assert e.target.relation == e.source.relation
  elif e.kind == "move":     # move the C S <relation> the C2 S2
    c, s = words[2:4]
    relation, (c2, s2) = " ".join(words[4:-3]), words[-2:]
    assert relation in shapes.RELATIONS and e.target.relation == relation
    mover = next(o for o in e.source.objects if (o.color, o.shape) == (c, s))
    ref = next(o for o in e.source.objects if (o.color, o.shape) == (c2, s2))
    moved = e.target.objects[0]
    assert (moved.color, moved.shape, moved.size) == (c, s, mover.size) and e.target.objects[1] == ref
    assert shapes.relation_holds(moved, ref, relation, 6.0) and not shapes.relation_holds(mover, ref, relation)
  elif e.kind == "add":      # add a/an C S
    c, s = words[2:]
    assert tgt[0] == src[0] and len(src) == 1 and len(tgt) == 2 and tgt[1][:2] == (c, s)
  else:                      # remove the C S
    c, s = words[2:]
    assert len(src) == 2 and tgt == [o for o in src if o[:2] != (c, s)] and len(tgt) == 1


def _edit_config(data_dir):
  c = data_testing.small_config(str(data_dir))
  c.data.image_text = "shapes_edit"
  c.data.shapes_train_size, c.data.shapes_eval_size = 32, 12
  return c


def test_builder_is_deterministic_and_targets_follow_the_instructions(tmp_path):
  a, b = (builtin.shapes_edit_dir(_edit_config(tmp_path / d)) for d in ("a", "b"))
  for split, n in (("train", 32), ("test", 12), ("heldout", 12)):
    ra, rb = builders.open_split(a, split), builders.open_split(b, split)
    assert len(ra) == len(rb) == n
    kinds = []
    for i in range(n):
      x, y = ra[i], rb[i]
      assert x["edit"] == y["edit"] and np.array_equal(x["target_image"], y["target_image"])
      e = shapes_edit.Edit.from_json(x["edit"].decode())
      kinds.append(e.kind)
      assert x["instruction"].decode() == e.instruction
      assert np.array_equal(x["source_image"], shapes.render(e.source))
      assert np.array_equal(x["target_image"], shapes.render(e.target))
      _check_matches_instruction(e)
      held = any((o.color, o.shape) in shapes.HELDOUT for o in e.objects())
      assert held == (split == "heldout")
    assert sorted(kinds) == sorted(shapes_edit.KINDS * (n // 4))   # kinds in turn (tfds orders records by key hash)


@pytest.mark.parametrize("kind", shapes_edit.KINDS)
def test_scorer_passes_every_ground_truth_edit_and_no_unedited_source(kind):
  for i in range(12):
    rng = np.random.default_rng([3, i])
    e = shapes_edit.sample_edit(rng, kind) if i % 2 else shapes_edit.sample_heldout_edit(rng, kind)
    res = 32 if i % 3 else 64   # the model's resolution, and the canvas
    assert edits.score_edit(shapes.render(e.target, res), e)["passed"], e.instruction
    assert not edits.score_edit(shapes.render(e.source, res), e)["passed"], e.instruction


def test_scorer_fails_an_edit_that_moved_what_it_should_keep():
  rng = np.random.default_rng(0)
  e = shapes_edit.sample_edit(rng, "remove")
  o = e.target.objects[0]
  shift = 8.0 if o.cx < 32 else -8.0
  drifted = dataclasses.replace(e.target, objects=(dataclasses.replace(o, cx=o.cx + shift),))
  v = edits.score_edit(shapes.render(drifted), e)
  assert v["caption"] and not v["keep"] and not v["passed"]


def test_edit_example_lays_out_source_instruction_target():
  tok = type("Tok", (), dict(bos_id=1, eos_id=2, boi_id=3, eoi_id=4, pad_id=0))()
  src, tgt = np.full((2, 5), 0.5, np.float32), np.full((2, 5), -0.5, np.float32)
  ex = examples.edit_example(src, [10, 11, 12], tgt, tok)
  assert ex["tokens"].tolist() == [1, 3, 0, 0, 4, 10, 11, 12, 3, 0, 0, 4, 2]
  assert ex["image_ids"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 2, 2, 0, 0]
  assert ex["noise_limited"].tolist() == [0, 0, 1, 1] + [0] * 9
  image = ex["modality"] == record.IMAGE
  assert (ex["patches"][image] == np.concatenate([src, tgt])).all() and not ex["splittable"]
  compact = examples.edit_example(src, [10, 11, 12], tgt, tok, compact=True)
  assert (compact["image_patches"] == np.concatenate([src, tgt])).all()


def _tiny(c):
  return data_testing.sampling_config(c)


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("edit_base") / "run")
  trainer.run(_tiny(data_testing.small_config()), wd)
  return wd


@pytest.fixture(scope="module")
def edit_workdir(base_workdir, tmp_path_factory):
  """One step at lr 1e-12 from base_workdir: the saved params are the loaded ones."""
  c = _tiny(data_testing.small_config())
  c.data.image_text = "shapes_edit"
  c.total_steps, c.checkpoint_every_steps = 1, 1
  c.optim.lr = c.optim.end_lr = 1e-12
  c.init_from = base_workdir
  wd = str(tmp_path_factory.mktemp("edit_ft") / "run")
  trainer.run(c, wd)
  return wd


def _saved(workdir, step, key):
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    return ckpt.read(step)[key]
  finally:
    ckpt.close()


def test_init_from_loads_the_params_not_the_step(base_workdir, edit_workdir):
  import jax
  loaded, new = _saved(base_workdir, 2, "ema"), _saved(edit_workdir, 1, "params")
  assert int(_saved(edit_workdir, 1, "step")) == 1
  close = jax.tree.map(lambda a, b: np.allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7), loaded, new)
  assert jax.tree.all(close)
  fresh = _saved(base_workdir, 2, "params")   # trained params differ from the EMA: the EMA was taken
  assert not jax.tree.all(jax.tree.map(lambda a, b: np.allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7),
                                       fresh, new))


def test_init_from_a_model_of_another_shape_is_one_line(base_workdir, tmp_path):
  c = _tiny(data_testing.small_config())
  c.model.d_model = 64
  c.init_from = base_workdir
  with pytest.raises(trainer.ConfigError, match=r"^init_from: param .* has shape .* in this config") as e:
    trainer.run(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  c.init_from = str(tmp_path / "nothing")
  with pytest.raises(trainer.ConfigError, match="init_from: no checkpoints"):
    trainer.run(c, str(tmp_path / "run2"))


def test_experiment_file_fine_tunes_the_shapes_model():
  c, base = train_helpers.experiment_config("shapes_edit"), train_helpers.experiment_config("shapes")
  assert c.model == base.model and c.image == base.image and c.data.image_text == "shapes_edit"
  assert train_helpers.experiment_config("shapes_edit", "tiny").model == train_helpers.experiment_config(
      "shapes", "tiny").model


def test_sample_edit_writes_images(edit_workdir, tmp_path, capsys):
  src = tmp_path / "scene.png"
  Image.fromarray(shapes.render(shapes.sample_spec(np.random.default_rng(0), kind="single"))).save(src)
  out = tmp_path / "edited"
  code = sample.main(["--workdir", edit_workdir, "--edit", str(src), "--instruction", "add a red circle",
                      "--num", "2", "--out", str(out), "--steps", "2"])
  err = capsys.readouterr().err
  assert code == 0, err
  assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "grid.png"]
  assert np.asarray(Image.open(out / "00000.png")).shape == (16, 16, 3)


def test_sample_edit_needs_an_instruction(edit_workdir, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    sample.main(["--workdir", edit_workdir, "--edit", str(tmp_path / "x.png"), "--out", str(tmp_path)])
  assert e.value.code == 2 and "--instruction" in capsys.readouterr().err


def test_evaluate_reports_edit_rates_per_kind(edit_workdir, capsys):
  code = evaluate.main(["--workdir", edit_workdir, "--edits", "4", "--edits_heldout", "4", "--steps", "2"])
  out, err = capsys.readouterr()
  assert code == 0, err
  path = out.strip().splitlines()[-1].split()[-1]
  saved = json.loads(open(path).read())
  m = saved["metrics"]
  for kind in shapes_edit.KINDS:
    assert 0.0 <= m[f"edit_pass_{kind}"] <= m[f"edit_caption_{kind}"] and f"edit_heldout_pass_{kind}" in m
    assert kind in out
  assert m["edit_num"] == 4 and m["edit_heldout_num"] == 4 and len(saved["edits"]) == 8
  rows = saved["edits"]
  assert m["edit_pass"] == np.mean([r["passed"] for r in rows[:4]])
  assert os.path.exists(path[:-len(".json")] + ".png")
