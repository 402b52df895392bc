"""`tfx.sample` and `tfx.evaluate` as 2 processes x 4 CPU devices against 1 process x 8 devices.

The one-process reference runs here (pytest has 8 simulated devices); the 2-process runs are
launched together, each pair with the process flags `tfx.train` takes.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data_testing
from tfx import distributed, evaluate, sample, trainer
from tfx.data import shapes

REPO = pathlib.Path(__file__).resolve().parents[1]
MESH = "data=2,fsdp=2,tensor=2"  # the 2-process image run names it; the others use the default (fsdp=8)
EVAL_ARGS = ["--num", "3", "--num_heldout", "0", "--steps", "2", "--cfg_scales", "1", "--caption_tokens", "4",
             "--text_records", "2", "--batch_size", "4", "--no_alt"]  # no guidance here: tfx.sample covers it


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  c = data_testing.sampling_config()
  wd = str(tmp_path_factory.mktemp("multihost_cli") / "run")
  trainer.run(c, wd)
  return wd


@pytest.fixture(scope="module")
def shapesnet_path(tmp_path_factory):
  """A briefly trained ShapesNet, so neither run trains one (slow)."""
  return data_testing.tiny_shapesnet(tmp_path_factory.mktemp("shapesnet") / "net.npz")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_pair(module: str, args: list[str]) -> list[subprocess.Popen]:
  """`python -m MODULE ARGS` as processes 0 and 1 of 2, 4 CPU devices each."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  port = _free_port()
  return [subprocess.Popen([sys.executable, "-m", module, *map(str, args), f"--coordinator_address=127.0.0.1:{port}",
                            "--num_processes=2", f"--process_id={i}"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def _finish(pair) -> list[tuple[int, str, str]]:
  outs = [p.communicate(timeout=600) for p in pair]
  return [(p.returncode, *out) for p, out in zip(pair, outs)]


def _json_lines(stdout: str) -> list[dict]:
  # on CPU the Gloo collectives print their connection notices on stdout too
  return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path), np.int16)


def test_two_processes_sample_and_evaluate_like_one_process(workdir, shapesnet_path, tmp_path, capsys):
  one, two = tmp_path / "one", tmp_path / "two"
  pngs = []
  for i, spec in enumerate(shapes.sample_spec(np.random.default_rng(0)) for _ in range(4)):
    pngs.append(str(tmp_path / f"in{i}.png"))
    Image.fromarray(shapes.render(spec)).save(pngs[-1])
  t2i = ["--workdir", workdir, "--prompt", "a red circle", "--num", "4", "--steps", "2", "--batch_size", "4",
         "--mesh", MESH]
  caption = ["--workdir", workdir, "--image", *pngs, "--max_tokens", "5", "--batch_size", "4"]
  reference = str(tmp_path / "reference_run")  # the one-process evaluation writes beside a copy
  shutil.copytree(workdir, reference)
  # the 2-process runs first (they wait on each other's collectives), then the references here meanwhile
  pairs = {"t2i": _launch_pair("tfx.sample", [*t2i, "--out", two]),
           "caption": _launch_pair("tfx.sample", caption),
           "eval": _launch_pair("tfx.evaluate", ["--workdir", workdir, *EVAL_ARGS, "--shapesnet", shapesnet_path]),
           "too_big": _launch_pair("tfx.sample", [*caption, "--mesh", "fsdp=16"])}
  assert sample.main([*t2i, "--out", str(one)]) == 0
  assert sample.main([*caption, "--mesh", "fsdp=8"]) == 0
  want_captions = _json_lines(capsys.readouterr().out)
  assert evaluate.main(["--workdir", reference, *EVAL_ARGS, "--shapesnet", shapesnet_path, "--mesh", "fsdp=8"]) == 0
  capsys.readouterr()
  want_eval = json.loads(pathlib.Path(reference, "eval", "2.json").read_text())
  done = {name: _finish(pair) for name, pair in pairs.items()}
  for name in ("t2i", "caption", "eval"):
    for code, _, err in done[name]:
      assert code == 0, (name, err[-3000:])

  # the same images (uint8 rounding of fp32 sums in another order), written once, by process 0
  assert sorted(os.listdir(two)) == sorted(os.listdir(one)) == [*(f"{i:05d}.png" for i in range(4)), "grid.png"]
  for name in os.listdir(one):
    assert np.abs(_png(one / name) - _png(two / name)).max() <= 1, name
  # the same greedy captions, printed by process 0 only
  (_, out0, _), (_, out1, _) = done["caption"]
  assert _json_lines(out0) == want_captions and any(c["caption"] for c in want_captions)
  assert _json_lines(out1) == [] and "caption" not in out1
  # one evaluation record, with the same captions and scores
  eval_dir = pathlib.Path(workdir, "eval")
  assert sorted(os.listdir(eval_dir)) == ["2.json", "2.png"]
  got_eval = json.loads((eval_dir / "2.json").read_text())
  assert got_eval["captions"] == want_eval["captions"]
  assert set(got_eval["metrics"]) == set(want_eval["metrics"])
  for key, value in want_eval["metrics"].items():
    if not key.endswith("seconds"):
      assert got_eval["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  assert "wrote" in done["eval"][0][1] and "wrote" not in done["eval"][1][1]
  # a mesh larger than the 8 devices of both processes: each exits 2 with one line
  for code, _, err in done["too_big"]:
    assert code == 2 and err.strip().splitlines() == [
        "tfx.sample: error: mesh: data*fsdp*tensor = 16 but there are 8 devices"], err


def test_process_flags_go_together():
  distributed.check_flags(None, None, None)
  distributed.check_flags("h:1", 2, 0)
  for flags, message in (((None, 2, None), "--num_processes needs --coordinator_address and --process_id"),
                         (("h:1", None, 1), "--coordinator_address and --process_id need --num_processes too"),
                         (("h:1", 0, 0), "--num_processes must be >= 1"),
                         (("h:1", 2, 2), r"--process_id must be in \[0, 2\)")):
    with pytest.raises(distributed.DistributedError, match=message):
      distributed.check_flags(*flags)


def test_bad_process_flags_exit_2_with_one_line(tmp_path, capsys):
  message = "--num_processes needs --coordinator_address and --process_id too (give all three process flags or none)"
  for main, args in ((sample.main, ["--prompt=a", f"--out={tmp_path}"]), (evaluate.main, [])):
    with pytest.raises(SystemExit) as e:
      main([f"--workdir={tmp_path}", *args, "--num_processes=2"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"{main.__module__}: error: {message}"]
  proc = subprocess.run([sys.executable, "-m", "tfx.train", f"--workdir={tmp_path}",
                         "--config=experiments/shapes.py:tiny", "--num_processes=2"],
                        cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"tfx.train: error: {message}"], proc.stderr
