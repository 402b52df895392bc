"""`python -m tfx.bench`: attention timings and the timed train step, on a shrunk shapes config."""
import json
import subprocess
import sys

import pytest

from tfx import bench


def test_bench_times_attention_paths_and_the_step(tmp_path):
  out = tmp_path / "bench.json"
  # linear patches: the U-Net's compile took 15 of the test's 25 s, and bench times it like any layer
  overrides = {"seq_len": 64, "global_batch_size": 2, "model.n_layers": 1, "model.d_model": 64,
               "model.encoder": "linear"}
  results = bench.run(["shapes"], steps=1, attention_only=False, steps_only=False, interpret=True,
                      check=False, out_path=str(out), overrides=overrides, reps=1)
  assert json.loads(out.read_text()) == results
  timed = {(r["mask"], r["path"]): r for r in results if r["kind"] == "attention"}
  assert set(timed) == {(m, p) for m in ("data_mix", "causal") for p in ("dense", "flash")}
  assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in timed.values())
  assert timed["causal", "dense"]["shape"] == [2, 64, 4, 4, 16]
  (step,) = [r for r in results if r["kind"] == "step"]
  assert step["seq_len"] == 64 and step["step_seconds_median"] > 0 and step["params"] > 0


@pytest.mark.parametrize("args, message", [
    (["--sizes=huge"], "unknown size 'huge'"),
    (["--set=model.nope=1"], "no such config key"),
    (["--steps=0"], "--steps must be >= 1"),
])
def test_bench_cli_rejects_bad_input_in_one_line(args, message):
  proc = subprocess.run([sys.executable, "-m", "tfx.bench", *args], capture_output=True, text=True,
                        env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=120)
  assert proc.returncode == 2
  assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
