"""`python -m tfx.evaluate` and the training Evaluator end to end against a tiny checkpoint trained here."""
import json
import math
import os

import numpy as np
import pytest

import data_testing
from tfx import evaluate, trainer
from tfx.eval import results


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  c = data_testing.sampling_config()
  wd = str(tmp_path_factory.mktemp("eval_cli") / "run")
  trainer.run(c, wd)
  return wd


@pytest.fixture(scope="module")
def shapesnet_path(tmp_path_factory):
  """A briefly trained ShapesNet, so the CLI loads it instead of training one (slow)."""
  return data_testing.tiny_shapesnet(tmp_path_factory.mktemp("shapesnet") / "net.npz")


def test_cli_writes_json_grid_tensorboard_and_table(workdir, shapesnet_path, capsys):
  args = ["--workdir", workdir, "--num", "6", "--num_heldout", "3", "--cfg_scales", "2", "1",
          "--steps", "2", "--caption_tokens", "4", "--text_records", "2", "--shapesnet", shapesnet_path,
          "--cfg_interval", "0", "0.5", "--clip_x0", "1", "--best_of", "2"]
  assert evaluate.main(args) == 0
  out, err = capsys.readouterr()
  record = json.loads(open(os.path.join(workdir, "eval", "2.json")).read())
  m = record["metrics"]
  # rates over the 6 test pairs; the 3 held-out pairs only in *_heldout_*
  assert record["step"] == 2 and m["t2i_num"] == 6 and m["caption_num"] == 6
  assert record["options"]["cfg_interval"] == [0.0, 0.5] and record["options"]["clip_x0"] == 1.0
  assert record["options"]["best_of"] == 2
  for key in ("t2i_pass", "t2i_pass_single", "t2i_pass_count", "t2i_pass_relation", "t2i_color_acc",
              "t2i_position_acc", "t2i_heldout_pass", "t2i_pass@cfg1_steps2", "caption_exact_match",
              "caption_scorer_pass", "caption_heldout_exact_match", "caption_exact_match_single",
              "caption_exact_match_count", "caption_exact_match_relation"):
    assert 0.0 <= m[key] <= 1.0, key
  for key in ("ppl_text", "ppl_caption", "ppl_caption_given_image", "fd_shapesnet", "caption_cider_d"):
    assert math.isfinite(m[key]) and m[key] >= 0, key
  assert m["ppl_text"] > 1 and len(record["captions"]) == 9  # every generated caption, with its reference
  assert {c["kind"] for c in record["captions"]} == {"single", "count", "relation"}
  assert os.path.isfile(os.path.join(workdir, "eval", "2.png"))
  assert "text-to-image pass" in out and "perplexity held-out text" in out and "cfg1_steps2" in out
  assert "6 test pairs (rates below), 3 held-out" in out
  # the alt split (evaluation-only renderer) beside it: its own JSON, a column headed "alt"
  alt = json.loads(open(os.path.join(workdir, "eval", "2_alt.json")).read())
  assert alt["options"]["split"] == "alt" and alt["metrics"]["t2i_num"] == 6 and len(alt["captions"]) == 9
  assert [c["reference"] for c in alt["captions"]] != [c["reference"] for c in record["captions"]]
  assert "6 alt pairs (rates below), 3 held-out" in out
  lines = out.splitlines()
  assert any(line.split() == ["test", "alt"] for line in lines)
  row = next(line for line in lines if line.startswith("caption exact match "))
  assert row.split()[3:] == [f"{m['caption_exact_match']:.1%}", f"{alt['metrics']['caption_exact_match']:.1%}"]
  assert os.path.isfile(os.path.join(workdir, "eval", "2_alt.png"))
  assert any("tfevents" in f for f in os.listdir(os.path.join(workdir, "tensorboard")))
  # a second evaluation of the same step goes beside the first, never over it
  eval_dir = os.path.join(workdir, "eval")
  assert results._free_path(eval_dir, "2", ".json") == os.path.join(eval_dir, "2-1.json")


def test_evaluator_returns_eval_scalars_and_reuses_compiled_generator(workdir):
  from tfx import restore
  from tfx.eval.evaluator import Evaluator
  config, model = restore.restore_model(workdir)
  evaluator = Evaluator(config)
  first = evaluator.run(model)
  gen = evaluator._generator
  second = evaluator.run(model)
  assert evaluator._generator is gen
  assert first == second
  assert {"eval_t2i_pass", "eval_t2i_pass_single", "eval_caption_exact_match", "eval_ppl_text"} <= set(first)
  assert all(isinstance(v, float) and math.isfinite(v) for v in first.values())
  grid = evaluator.sample_grid(model, samples_per_prompt=2)
  assert evaluator._generator is gen
  res = config.image.resolution
  assert grid.dtype == np.uint8 and grid.shape == (len(config.sample_prompts) * (res + 2) + 2, 2 * (res + 2) + 2, 3)


def test_bad_input_exits_2_with_one_line(workdir, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  assert evaluate.main(["--workdir", str(empty)]) == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1
  for bad in (["--workdir", str(tmp_path / "missing")], ["--workdir", workdir, "--num", "0"],
              ["--workdir", workdir, "--inception_weights", str(tmp_path / "nope.safetensors")],
              ["--workdir", workdir, "--mesh", "tensor=two"], ["--workdir", workdir, "--cfg_interval", "0.7", "0.2"],
              ["--workdir", workdir, "--clip_x0", "-1"], ["--workdir", workdir, "--best_of", "0"]):
    with pytest.raises(SystemExit) as e:
      evaluate.main(bad)
    assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-3] == "python -m tfx.evaluate: error: --cfg_interval must satisfy 0 <= lo <= hi <= 1, got (0.7, 0.2)"
  assert err[-2] == "python -m tfx.evaluate: error: --clip_x0 must be a number >= 0 (0 = off), got -1.0"
  assert err[-1] == "python -m tfx.evaluate: error: --best_of must be an integer >= 1 (1 = no reranking), got 0"
  assert evaluate.main(["--workdir", workdir, "--mesh", "fsdp=3"]) == 2  # 8 devices
  err = capsys.readouterr().err
  assert "data*fsdp*tensor = 3 but there are 8 devices" in err and len(err.strip().splitlines()) == 1


def test_mesh_flag_evaluates_like_one_device(workdir, shapesnet_path, capsys):
  """Sharded over fsdp=8 (batch 3 rows: the KV cache rows stay replicated), the scores and captions match."""
  records = []
  for extra in ([], ["--mesh", "fsdp=8"]):
    args = ["--workdir", workdir, "--num", "3", "--num_heldout", "0", "--steps", "2", "--caption_tokens", "4",
            "--text_records", "2", "--shapesnet", shapesnet_path, "--no_alt", *extra]
    assert evaluate.main(args) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote ")
    records.append(json.loads(open(path).read()))
  one, sharded = records
  assert sharded["captions"] == one["captions"]
  for key, value in one["metrics"].items():
    if not key.endswith("seconds"):
      assert sharded["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
