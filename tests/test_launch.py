"""launch/tpu_pod.sh and launch/gpu_slurm.sh: printed commands, real runs against fake cluster tools."""
import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_pod.sh"
SLURM = REPO / "launch" / "gpu_slurm.sh"
CONFIG = "tfx/config.py"

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, pathlib, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
made = pathlib.Path(os.environ["FAKE_LOG"] + ".created")
if "describe" in args:
  if not made.exists():
    sys.exit(1)
  print("ACTIVE")
if "create" in args:
  made.touch()
"""
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) "$@"
done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames node[001-002]" ]] || exit 1
printf 'node001\\nnode002\\n'
"""
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
print(json.dumps(dict(argv=sys.argv[1:], cuda=os.environ.get("CUDA_VISIBLE_DEVICES"))))
"""


def _tool(directory: pathlib.Path, name: str, text: str) -> None:
  path = directory / name
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_bin(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in [("gcloud", FAKE_GCLOUD), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                     ("python3", FAKE_PYTHON)]:
    _tool(bin_dir, name, text)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls.jsonl"),
             TMPDIR=str(tmp_path))
  return env


def _run(script, *args, env=None):
  return subprocess.run([str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


TPU_ARGS = ["--tpu=pod-a", "--zone=us-east5-a", "--accelerator=v5p-128", f"--config={CONFIG}",
            "--workdir=gs://bucket/run 1", "--project=proj"]
EXTRA = ["--", "--config.total_steps=7", "--config.data.text=it's"]


def _train_argv(ssh_argv):
  command = next(a for a in ssh_argv if a.startswith("--command="))[len("--command="):]
  words = shlex.split(command)
  assert words[:6] == ["cd", "~/tfx", "&&", "python3", "-m", "tfx.train"]
  return words[6:]


def test_tpu_dry_print_is_well_formed():
  r = _run(TPU, *TPU_ARGS, "--dry-print", *EXTRA)
  assert r.returncode == 0, r.stderr
  lines = [shlex.split(line) for line in r.stdout.strip().splitlines()]
  create_line = lines[0]
  split = create_line.index("||")
  assert create_line[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "pod-a"]
  assert create_line[split + 1:split + 6] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert "--accelerator-type=v5p-128" in create_line and "--version=v2-alpha-tpuv5" in create_line
  gcloud = [w for w in lines if w[0] == "gcloud" and w[4] in ("scp", "ssh")]
  assert [w[4] for w in gcloud] == ["scp", "ssh", "ssh"]
  for words in gcloud:  # every step reaches every worker of the slice
    assert "--worker=all" in words and "--zone=us-east5-a" in words and "--project=proj" in words
  train = _train_argv(gcloud[-1])
  assert train == [f"--config={CONFIG}", "--workdir=gs://bucket/run 1", "--config.total_steps=7",
                   "--config.data.text=it's"]
  # ids come from the TPU runtime, so the command is identical on all workers
  assert not any(a.startswith(("--process_id", "--num_processes", "--coordinator")) for a in train)


def test_tpu_run_executes_what_dry_print_shows(fake_bin, tmp_path):
  printed = _run(TPU, *TPU_ARGS, "--dry-print", env=fake_bin).stdout.strip().splitlines()
  r = _run(TPU, *TPU_ARGS, env=fake_bin)
  assert r.returncode == 0, r.stderr
  calls = [json.loads(line) for line in pathlib.Path(fake_bin["FAKE_LOG"]).read_text().splitlines()]
  expected = []
  for line in printed:
    words = shlex.split(line)
    if words[0] == "gcloud":
      expected.append(words[1:words.index(">/dev/null")] if ">/dev/null" in words else words[1:])
    if "||" in words:
      expected.append(words[words.index("||") + 2:])
  assert calls == expected
  with tarfile.open(tmp_path / "tfx-src-pod-a.tar.gz") as tar:
    names = tar.getnames()
  assert "tfx/config.py" in names and "launch/tpu_pod.sh" in names
  assert not any(n.startswith(".git/") for n in names)


def test_tpu_reuses_an_existing_slice(fake_bin):
  pathlib.Path(fake_bin["FAKE_LOG"] + ".created").touch()
  assert _run(TPU, *TPU_ARGS, env=fake_bin).returncode == 0
  calls = [json.loads(line) for line in pathlib.Path(fake_bin["FAKE_LOG"]).read_text().splitlines()]
  assert not any("create" in c for c in calls)


def test_tpu_multislice_uses_queued_resource_and_dcn(fake_bin):
  r = _run(TPU, *TPU_ARGS, "--slices=2", "--spot", env=fake_bin)
  assert r.returncode == 0, r.stderr
  calls = [json.loads(line) for line in pathlib.Path(fake_bin["FAKE_LOG"]).read_text().splitlines()]
  create = next(c for c in calls if "create" in c)
  assert create[:4] == ["compute", "tpus", "queued-resources", "create"]
  assert {"--node-count=2", "--node-prefix=pod-a", "--spot", "--runtime-version=v2-alpha-tpuv5"} <= set(create)
  train = [c for c in calls if c[3] == "ssh" and any(a.startswith("--command=cd") for a in c)]
  assert sorted(c[4] for c in train) == ["pod-a-0", "pod-a-1"]  # slices start concurrently
  argvs = [_train_argv(c) for c in train]
  assert argvs[0] == argvs[1] and "--config.mesh.dcn_data=2" in argvs[0]


@pytest.mark.parametrize("bad, message", [
    (["--tpu=pod-a"], "missing --zone"),
    ([a for a in TPU_ARGS if not a.startswith("--workdir")], "missing --workdir"),
    ([*TPU_ARGS[:4], "--workdir=/local/dir"], "must be a gs:// path"),
    ([*TPU_ARGS, "--slices=0"], "--slices"),
    ([*TPU_ARGS, "--bogus"], "unknown argument '--bogus'"),
    (["--tpu=Pod_A", *TPU_ARGS[1:]], "lowercase"),
    ([*TPU_ARGS[:3], "--config=experiments/nope.py:size=7B", *TPU_ARGS[4:]], "does not exist"),
])
def test_tpu_usage_errors(bad, message, fake_bin):
  r = _run(TPU, *bad, env=fake_bin)
  assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert not pathlib.Path(fake_bin["FAKE_LOG"]).exists()  # nothing ran


def _slurm_tasks(fake_bin, tmp_path, per, nodes=2, gpus=4):
  r = _run(SLURM, f"--nodes={nodes}", f"--gpus_per_node={gpus}", f"--config={CONFIG}",
           "--workdir=/shared/runs/a b", f"--per={per}", "--partition=h100", "--dry-print", *EXTRA)
  assert r.returncode == 0, r.stderr
  script = tmp_path / "job.sbatch"
  script.write_text(r.stdout)
  per_node = gpus if per == "gpu" else 1
  assert f"#SBATCH --ntasks-per-node={per_node}\n" in r.stdout
  assert f"#SBATCH --nodes={nodes}\n" in r.stdout and f"#SBATCH --gpus-per-node={gpus}\n" in r.stdout
  env = dict(fake_bin, SLURM_JOB_NODELIST="node[001-002]", SLURM_NTASKS=str(nodes * per_node),
             SLURM_NTASKS_PER_NODE=str(per_node))
  run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stderr
  return [json.loads(line) for line in run.stdout.splitlines()]


def test_slurm_one_process_per_gpu(fake_bin, tmp_path):
  tasks = _slurm_tasks(fake_bin, tmp_path, "gpu")
  assert len(tasks) == 8
  for i, task in enumerate(tasks):
    assert task["argv"] == ["-m", "tfx.train", f"--config={CONFIG}", "--workdir=/shared/runs/a b",
                            "--config.total_steps=7", "--config.data.text=it's",
                            "--coordinator_address=node001:8476", "--num_processes=8", f"--process_id={i}"]
    assert task["cuda"] == str(i % 4)


def test_slurm_one_process_per_node(fake_bin, tmp_path):
  tasks = _slurm_tasks(fake_bin, tmp_path, "node")
  assert [t["argv"][-1] for t in tasks] == ["--process_id=0", "--process_id=1"]
  assert all(t["argv"][-2] == "--num_processes=2" and t["cuda"] is None for t in tasks)


@pytest.mark.parametrize("bad, message", [
    (["--gpus_per_node=8", f"--config={CONFIG}", "--workdir=/w"], "--nodes"),
    (["--nodes=2", "--gpus_per_node=8", "--workdir=/w"], "missing --config"),
    (["--nodes=2", "--gpus_per_node=8", f"--config={CONFIG}", "--workdir=/w", "--per=rack"], "--per"),
    (["--nodes=2", "--gpus_per_node=8", f"--config={CONFIG}", "--workdir=/w", "--port=99999"], "--port"),
])
def test_slurm_usage_errors(bad, message, fake_bin):
  r = _run(SLURM, *bad, env=fake_bin)
  assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_launchers_install_the_gcs_extra_for_url_workdirs():
  tpu = [shlex.split(line) for line in _run(TPU, *TPU_ARGS, "--dry-print").stdout.splitlines()]
  install = next(a for w in tpu for a in w if a.startswith("--command=rm -rf ~/tfx"))
  assert shlex.split(install)[-2:] == ["-e", "$HOME/tfx[gcs]"]
  slurm = [SLURM, "--nodes=2", "--gpus_per_node=8", f"--config={CONFIG}", "--dry-print"]
  lines = _run(*slurm, "--workdir=gs://bucket/run").stdout.splitlines()
  pip = next(i for i, line in enumerate(lines) if " pip install " in line)
  assert shlex.split(lines[pip]) == ["python3", "-m", "pip", "install", "-q", "-e", f"{REPO}[gcs]"]
  assert lines[pip + 1].startswith("srun ")
  assert not any(" pip install " in line for line in _run(*slurm, "--workdir=/shared/run").stdout.splitlines())
