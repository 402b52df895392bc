"""tfx.sweep: variants, resume of a half-finished grid, report from recorded JSON, the parity ratio."""
import json
import math
import os
import sys

import pytest

import data_testing
from train_helpers import ROOT, persistent_compile_cache, tiny_config
from tfx import sweep, trainer, workdir as workdir_lib
from tfx.sweeps import parallel, report, runner, spec

CONFIG = str(ROOT / "experiments" / "shapes.py") + ":tiny"
A, B = "image_attention=bidirectional", "image_attention=causal"


def test_grid_names_types_and_bad_input():
  base = tiny_config()
  grid = spec.parse_assignments(base, ["model.image_attention=bidirectional,causal",
                                       "model.unet_channels=(8,16),(16,32)", "diffusion.loss_weight=1,5"],
                                many=True)
  variants = spec.grid_variants(grid)
  assert len(variants) == 8
  assert variants[0].name == "image_attention=bidirectional+unet_channels=8-16+loss_weight=1.0"
  assert variants[-1].overrides == {"model.image_attention": "causal", "model.unet_channels": (16, 32),
                                    "diffusion.loss_weight": 5.0}
  config = spec.apply(base, variants[-1].overrides)
  assert config.model.unet_channels == (16, 32) and base.model.image_attention == "bidirectional"
  with pytest.raises(spec.SweepError, match="unknown config key 'model.nope'"):
    spec.parse_assignments(base, ["model.nope=1,2"], many=True)
  with pytest.raises(spec.SweepError, match="not a int"):
    spec.parse_assignments(base, ["total_steps=ten"], many=True)
  with pytest.raises(spec.SweepError, match="not a directory name"):
    spec.check_names([spec.Variant("a,b", {})])
  with pytest.raises(spec.SweepError, match="repeat"):
    spec.check_names([spec.Variant("x", {}), spec.Variant("x", {})])


def test_sweep_files_python_and_json(tmp_path):
  (tmp_path / "s.py").write_text('VARIANTS = {"linear": {"model.encoder": "linear"}, '
                                 '"unet8": {"model.encoder": "unet", "image.patch_size": 8}}\n')
  (tmp_path / "s.json").write_text(json.dumps({"lam1": {"diffusion.loss_weight": 1.0}}))
  variants = spec.load_sweep_file(str(tmp_path / "s.py"))
  assert [v.name for v in variants] == ["linear", "unet8"]
  assert spec.apply(tiny_config(), variants[1].overrides).image.patch_size == 8
  assert spec.load_sweep_file(str(tmp_path / "s.json"))[0].overrides == {"diffusion.loss_weight": 1.0}
  (tmp_path / "bad.json").write_text("[1, 2]")
  with pytest.raises(spec.SweepError, match="expected VARIANTS"):
    spec.load_sweep_file(str(tmp_path / "bad.json"))
  with pytest.raises(spec.SweepError, match="unknown config key"):
    spec.apply(tiny_config(), {"model.encoderr": "unet"})


def test_the_committed_sweep_files_apply_and_chameleon_matches_its_experiment():
  """experiments/sweeps/*.py name real keys of shapes.py; the chameleon variant is chameleon.py."""
  shapes = spec.load_config(str(ROOT / "experiments" / "shapes.py"))
  ablations = spec.load_sweep_file(str(ROOT / "experiments" / "sweeps" / "ablations.py"))
  configs = {v.name: spec.apply(shapes, v.overrides) for v in ablations}
  assert configs["causal"].model.image_attention == "causal" and configs["unet_p4"].image.patch_size == 4
  assert (configs["lambda_1"].diffusion.loss_weight, configs["lambda_20"].diffusion.loss_weight) == (1.0, 20.0)
  pair = {v.name: v.overrides for v in spec.load_sweep_file(
      str(ROOT / "experiments" / "sweeps" / "transfusion_vs_chameleon.py"))}
  assert pair["transfusion"] == {}
  chameleon = spec.load_config(str(ROOT / "experiments" / "chameleon.py"))
  chameleon.autoencoder.path = pair["chameleon"]["autoencoder.path"]
  chameleon.data.image_text = pair["chameleon"]["data.image_text"]
  assert spec.apply(shapes, pair["chameleon"]).to_dict() == chameleon.to_dict()


def test_print_commands_plain_and_through_a_launcher(capsys, tmp_path):
  args = ["--config", CONFIG, "--grid", "model.image_attention=bidirectional,causal",
          "--set", "total_steps=8", "--workdir", str(tmp_path), "--print_commands"]
  assert sweep.main(args) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[1] == (f"python -m tfx.train --config={CONFIG} --workdir={tmp_path}/{B} "
                      f"--config.total_steps=8 --config.model.image_attention=causal")
  assert sweep.main(args + ["--launcher", "launch/gpu_slurm.sh --nodes=1 --gpus_per_node=8"]) == 0
  line = capsys.readouterr().out.splitlines()[0]
  assert line.startswith("launch/gpu_slurm.sh --nodes=1 --gpus_per_node=8 --config=")
  assert line.endswith(" -- --config.total_steps=8 --config.model.image_attention=bidirectional")
  assert not os.path.exists(tmp_path / A)  # printed, not run
  assert sweep.main(["--config", CONFIG, "--grid", "model.nope=1", "--workdir", str(tmp_path)]) == 2


# ---- the parity ratio and the report from recorded JSON ------------------------------------------


def _recorded_run(root, name, evals):
  """A workdir as a run leaves it: config.json, metrics.jsonl (equal steps) and eval/<step>.json."""
  wd = os.path.join(root, name)
  os.makedirs(os.path.join(wd, "eval"))
  config = tiny_config()
  config.model.vocab_size = 128
  workdir_lib.save_config(wd, config)
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    for step in (1, 5, 50):
      f.write(json.dumps({"step": step, "loss": 1.0, "text_tokens": 300.0, "images": 20.0}) + "\n")
  for step, metrics in evals.items():
    with open(os.path.join(wd, "eval", f"{step}.json"), "w") as f:
      json.dump({"step": step, "metrics": {**metrics, "eval_seconds": 1.0}}, f)


def test_parity_ratio_on_recorded_json_equals_the_hand_computation(tmp_path, capsys):
  # Every step costs the same FLOPs in both runs, so a FLOPs ratio is a step ratio.
  _recorded_run(tmp_path, "a", {10: {"t2i_pass": 0.2, "ppl_text": 20.0}, 100: {"t2i_pass": 0.5, "ppl_text": 10.0}})
  _recorded_run(tmp_path, "b", {1: {"t2i_pass": 0.1, "ppl_text": 30.0}, 10: {"t2i_pass": 0.4, "ppl_text": 12.0},
                                100: {"t2i_pass": 0.7, "ppl_text": 8.0}})
  _recorded_run(tmp_path, "c", {10: {"t2i_pass": 0.3, "ppl_text": 40.0}})
  args = ["--workdir", str(tmp_path), "--report_only", "--parity", "a,b", "--parity", "a,c"]
  assert sweep.main(args) == 0
  out = capsys.readouterr().out
  recorded = json.load(open(tmp_path / "report" / "points.json"))
  ratios = {(r["b"], r["metric"]): r for r in recorded["parity"]}
  # t2i_pass: A's best 0.5 at step 100; B passes 0.5 between step 10 (0.4) and 100 (0.7), a third
  # of the way in log steps: 10 * 10**(1/3) steps; ratio 10**(1/3) / 10.
  assert ratios[("b", "t2i_pass")]["ratio"] == pytest.approx(10 ** (1 / 3) / 10, rel=1e-9)
  # ppl_text (lower is better): A's best 10 at step 100; B: 12 at 10, 8 at 100 -> half way.
  assert ratios[("b", "ppl_text")]["ratio"] == pytest.approx(10 ** 0.5 / 10, rel=1e-9)
  assert ratios[("c", "t2i_pass")]["how"] == "never" and ratios[("c", "t2i_pass")]["ratio"] == pytest.approx(0.1)
  step_flops = recorded["points"][0]["flops"] / 10
  assert step_flops > 0 and all(p["flops"] == pytest.approx(p["step"] * step_flops) for p in recorded["points"])
  assert "| b | 100 |" in out and "B never matches" in out
  assert {"t2i_pass.png", "ppl_text.png", "README.md"} <= set(os.listdir(tmp_path / "report"))
  assert "eval_seconds.png" not in os.listdir(tmp_path / "report")


def test_flops_to_reach_cases():
  pts = [(1.0, 0.1), (10.0, 0.3), (100.0, 0.2), (1000.0, 0.9)]  # a dip: the best-so-far curve holds 0.3
  f, how = report.flops_to_reach(pts, 0.6, lower=False)
  assert how == "interpolated" and f == pytest.approx(math.exp(math.log(100) + 0.5 * math.log(10)))
  assert report.flops_to_reach(pts, 0.05, lower=False) == (1.0, "at most")
  assert report.flops_to_reach(pts, 0.95, lower=False) == (1000.0, "never")


# ---- a real half-finished grid --------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapesnet_path(tmp_path_factory):
  """A briefly trained ShapesNet, so evaluations load it instead of training one (slow)."""
  return data_testing.tiny_shapesnet(tmp_path_factory.mktemp("shapesnet") / "net.npz", scenes=32, steps=2)


def test_sweep_skips_the_finished_run_and_resumes_the_stopped_one(tmp_path, shapesnet_path, monkeypatch,
                                                                   capfd):
  data_dir = data_testing.small_config().data.data_dir
  common = ["--config", CONFIG, "--workdir", str(tmp_path / "sweep"), "--shapesnet", shapesnet_path,
            "--set", f"data.data_dir={data_dir}", "--set", "data.shapes_train_size=200",
            "--set", "data.shapes_eval_size=40", "--set", "diffusion.sample_steps=2",
            "--set", "sample_every_steps=0", "--plot_metrics", "t2i_pass",
            "--eval_steps", "4", "--eval_num", "3", "--eval_num_heldout", "0", "--eval_text_records", "1",
            "--eval_caption_tokens", "3", "--eval_batch_size", "3"]
  root = tmp_path / "sweep"
  with persistent_compile_cache(tmp_path / "cache"):
    # A finished earlier (trained to 4 and evaluated) ...
    assert sweep.main(common + ["--grid", "model.image_attention=bidirectional"]) == 0
    assert sorted(os.listdir(root / A / "eval")) == ["4.json", "4.png"]
    finished = {f: os.path.getmtime(root / A / "eval" / f) for f in os.listdir(root / A / "eval")}
    # ... B stopped at step 2, before any evaluation.
    config_b = spec.apply(spec.load_config(CONFIG), {
        "data.data_dir": data_dir, "data.shapes_train_size": 200, "data.shapes_eval_size": 40,
        "model.image_attention": "causal", "stop_after_step": 2, "sample_every_steps": 0})
    trainer.run(config_b, str(root / B))
    capfd.readouterr()

    calls = []
    real_run = trainer.run
    monkeypatch.setattr(trainer, "run", lambda c, wd: calls.append((os.path.basename(wd), c.stop_after_step))
                        or real_run(c, wd))
    assert sweep.main(common + ["--grid", "model.image_attention=bidirectional,causal"]) == 0
  err = capfd.readouterr().err
  assert calls == [(B, 0)]  # only B trained, from its checkpoint at 2 to the end
  assert "resumed from the checkpoint at step 2" in err and f"{A}: finished before; skipped" in err
  assert {f: os.path.getmtime(root / A / "eval" / f) for f in os.listdir(root / A / "eval")} == finished
  assert sorted(os.listdir(root / B / "eval")) == ["4.json", "4.png"]
  assert json.loads(open(root / B / "config.json").read())["model"]["image_attention"] == "causal"
  assert [(p["variant"], p["step"]) for p in json.load(open(root / "report" / "points.json"))["points"]] == [
      (A, 4), (B, 4)]
  table = open(root / "report" / "README.md").read()
  assert f"| {A} | 4 |" in table and f"| {B} | 4 |" in table and "t2i_pass" in table
  assert os.path.getsize(root / "report" / "t2i_pass.png") > 1000
  # the report redrawn from the recorded JSON alone is the same
  os.remove(root / "report" / "README.md")
  assert sweep.main(["--workdir", str(root), "--report_only", "--plot_metrics", "t2i_pass"]) == 0
  assert open(root / "report" / "README.md").read() == table
  assert runner.is_finished(str(root / B), spec.apply(config_b, {"stop_after_step": 0}), [4])


def test_sweep_side_by_side_runs_each_variant_in_its_own_process(tmp_path, shapesnet_path):
  root = tmp_path / "sweep"
  args = ["--config", CONFIG, "--workdir", str(root), "--shapesnet", shapesnet_path, "--jobs", "2",
          "--grid", "model.image_attention=bidirectional,causal",
          "--set", f"data.data_dir={data_testing.small_config().data.data_dir}",
          "--set", "data.shapes_train_size=200", "--set", "data.shapes_eval_size=40",
          "--set", "diffusion.sample_steps=2", "--set", "sample_every_steps=0", "--plot_metrics", "t2i_pass",
          "--eval_steps", "4", "--eval_num", "3", "--eval_num_heldout", "0", "--eval_text_records", "1",
          "--eval_caption_tokens", "3", "--eval_batch_size", "3"]
  assert sweep.main(args) == 0
  for name in (A, B):
    assert sorted(os.listdir(root / name / "eval")) == ["4.json", "4.png"]
    assert "tfx.sweep: evaluating on 3 pairs" in (root / "logs" / f"{name}.log").read_text()
  assert json.loads((root / "sweep.json").read_text())["variants"][1]["name"] == B
  table = (root / "report" / "README.md").read_text()
  assert f"| {A} | 4 |" in table and f"| {B} | 4 |" in table
  assert json.loads((root / B / "config.json").read_text())["model"]["image_attention"] == "causal"
  assert sweep.main(args + ["--only", "nope"]) == 2


def test_parallel_runs_at_most_jobs_at_once_and_reports_each_exit_code(tmp_path):
  script = ("import sys, time; open(sys.argv[1], 'a').write(f'{time.time()}\\n'); "
            "time.sleep(2); print('child', sys.argv[2]); sys.exit(int(sys.argv[2]))")
  spans = tmp_path / "spans"
  commands = {f"v{i}": [sys.executable, "-c", script, str(spans), str(code)] for i, code in enumerate((0, 0, 3, 0))}
  messages = []
  codes = parallel.run(commands, 2, str(tmp_path / "logs"), log=messages.append)
  assert codes == {"v0": 0, "v1": 0, "v2": 3, "v3": 0}
  starts = sorted(float(line) for line in spans.read_text().splitlines())
  # the second starts while the first sleeps; the third only once one of them has ended
  assert starts[1] < starts[0] + 2 <= starts[2]
  assert (tmp_path / "logs" / "v2.log").read_text() == "child 3\n"
  assert any(m.startswith("v2: failed with exit code 3") for m in messages)
  assert parallel.child_env(4, {})["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225"
  assert parallel.child_env(4, {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"})["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".5"


def test_run_variant_trains_to_each_evaluation_step_and_resumes(monkeypatch, tmp_path):
  """The schedule alone (training and evaluation faked): stop at each evaluation step, evaluate it
  there, skip what is done; a run that went past an evaluation step without it logs and moves on."""
  ckpts, evaluated, trained = [], [], []

  def train(config, workdir):
    trained.append(config.stop_after_step)
    ckpts.append(config.stop_after_step or config.total_steps)

  def evaluate(workdir, step, options, generators):
    evaluated.append(step)
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    open(runner.eval_path(workdir, step), "w").close()

  monkeypatch.setattr(runner.restore, "checkpoint_steps", lambda wd: list(ckpts))
  monkeypatch.setattr(runner, "evaluate", evaluate)
  config = tiny_config(total_steps=6, checkpoint_every_steps=2)
  steps = runner.eval_steps(config, None)
  assert steps == [2, 4, 6] and runner.eval_steps(config, [3, 9]) == [3, 6]
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  ckpts.append(2)  # stopped at 2 before its evaluation
  assert runner.run_variant(config, wd, steps, None, train=train) == "ran"
  assert trained == [4, 0] and evaluated == [2, 4, 6]
  assert runner.run_variant(config, wd, steps, None, train=train) == "skipped"
  assert trained == [4, 0] and evaluated == [2, 4, 6]
  ckpts[:] = [6]  # evaluations asked for later, whose checkpoints are gone
  assert runner.run_variant(config, wd, [3, 6], None, train=train) == "ran"
  assert trained == [4, 0] and evaluated == [2, 4, 6]
