"""The paper path end to end at toy size, as docs/scale.md documents it.

A prepared image-caption set (tfx.data.prepare) with latents cached by the committed
diffusers VAE fixture (tfx.autoencoder.cache_latents), a prepared text set, the
Llama-layout tokenizer fixture, and `experiments/transfusion.py:size=0.16B,...` made
tiny by --config.* flags; trained by 2 processes x 4 CPU devices with evaluation on
(sample grids on 2 processes: tests/test_multihost.py), stopped after a checkpoint and
resumed by the same command, then scored by `python -m tfx.evaluate`.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tfx import metrics
from tfx.data import builders

from train_helpers import experiment_config

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
VAE = FIXTURES / "diffusers_vae_sd"          # 4 latent channels, downsample 2, scaling 0.18215
TOKENIZER = FIXTURES / "llama_layout.model"  # 4,000 pieces, no PAD/BOI/EOI
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40)}
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
TOTAL, STOP = 4, 2


def _run(args, env=None, timeout=300):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(latent image-caption dir, text dir): 24 captioned 24 px squares -> 16 px -> 8x8x4 latents."""
  root = tmp_path_factory.mktemp("paper_data")
  raw = root / "raw"
  raw.mkdir()
  rng = np.random.default_rng(0)
  rows = []
  for i in range(24):
    name, rgb = list(COLORS.items())[i % len(COLORS)]
    a = np.full((24, 24, 3), 255, np.uint8)
    x = int(rng.integers(0, 12))
    a[x:x + 12, x:x + 12] = rgb
    Image.fromarray(a).save(raw / f"{i}.png")
    rows.append(json.dumps({"image": f"{i}.png", "caption": f"a {name} square"}))
  (raw / "pairs.jsonl").write_text("\n".join(rows) + "\n")
  pixels, latents, text = root / "pixels", root / "latents", root / "text"
  _run(["tfx.data.prepare", f"--input={raw / 'pairs.jsonl'}", f"--output={pixels}", "--resolution=16",
        "--validation_fraction=0.25"])
  # the experiment reads the VAE's kind, channels and scaling from its folder; only the resolution is ours
  proc = _run(["tfx.autoencoder.cache_latents", f"--config=experiments/transfusion.py:size=0.16B,"
               f"image_text={pixels},vae={VAE}", "--config.image.resolution=16", f"--output={latents}"],
              env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert "cached latents" in proc.stdout

  def docs(n, seed):
    r = np.random.default_rng(seed)
    return lambda: ((f"{i:05d}", {"text": " ".join(r.choice(WORDS, int(r.integers(20, 80))))}) for i in range(n))

  builders.write_dataset(builders.ImageText, str(text), builders.text_features(),
                         {"train": docs(40, 1), "validation": docs(8, 2)})
  return latents, text, pixels


def _experiment(arg: str):
  return experiment_config("transfusion", arg)


def test_the_experiment_reads_the_vae_it_is_given():
  flux = _experiment(f"size=0.16B,vae={FIXTURES / 'diffusers_vae_flux'}").autoencoder
  assert (flux.kind, flux.latent_channels, flux.downsample) == ("diffusers", 4, 4)
  assert (flux.scaling_factor, flux.shift_factor) == pytest.approx((0.3611, 0.1159))
  away = _experiment("size=0.16B,vae=/not/on/this/machine")   # a dry run away from the data: the paper's VAE
  assert (away.autoencoder.kind, away.autoencoder.latent_channels, away.autoencoder.downsample) == ("vae", 8, 8)
  assert (away.image.resolution // away.autoencoder.downsample) ** 2 // away.image.patch_size ** 2 == 256


def test_evaluation_pairs_of_a_latent_cache_are_its_decoded_latents(data):
  from tfx import autoencoder
  from tfx.autoencoder import quality
  from tfx.eval import eval_set

  latents, _, pixels = data
  config = _experiment(f"size=0.16B,image_text={latents},vae={VAE}")
  config.image.resolution = 16
  got = eval_set.load_pairs(config, "test", 3)   # a prepared set has no test split: its validation split
  source = builders.open_split(str(pixels), "validation")
  assert got.captions == [source[i]["caption"].decode() for i in range(3)]
  want = quality.reconstruct(autoencoder.load(config), np.stack([source[i]["image"] for i in range(3)]))
  assert got.images.dtype == np.uint8 and np.abs(got.images.astype(int) - want).max() <= 1


def _flags(data) -> list[str]:
  latents, text, _ = data
  tiny = dict(model=dict(n_layers=1, d_model=64, n_heads=2, n_kv_heads=2, mlp_dim=128),
              seq_len=64, global_batch_size=8, total_steps=TOTAL, checkpoint_every_steps=2, log_every_steps=1,
              eval_every_steps=TOTAL, sample_every_steps=0,
              image=dict(resolution=16, max_images_per_seq=2), diffusion=dict(sample_steps=2),
              optim=dict(warmup_steps=2))
  flat = []
  for key, value in tiny.items():
    flat += ([(f"{key}.{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)])
  return ([f"--config=experiments/transfusion.py:size=0.16B,encoder=linear,patch=2,image_text={latents},"
           f"text={text},tokenizer={TOKENIZER},vae={VAE}"]
          + [f"--config.{k}={v}" for k, v in flat])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_two_processes(workdir, flags) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "tfx.train", f"--workdir={workdir}", *flags,
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]


def test_documented_paper_command_trains_resumes_and_evaluates(data, tmp_path):
  workdir = tmp_path / "run"
  flags = _flags(data)
  _train_two_processes(workdir, [*flags, f"--config.stop_after_step={STOP}"])
  assert [r["step"] for r in metrics.read_metrics(workdir) if "loss" in r] == [1, 2]
  _train_two_processes(workdir, flags)  # the same command resumes from the step-2 checkpoint

  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["n_layers"] == 1 and config["model"]["d_model"] == 64  # flags win over the preset
  assert config["model"]["vocab_size"] == 4096                                   # 4,000 pieces + 3, padded to 128
  assert (config["model"]["dtype"], config["model"]["remat"], config["model"]["scan_layers"]) == (
      "bfloat16", "full", True)
  ae = config["autoencoder"]
  assert (ae["kind"], ae["latent_channels"], ae["downsample"]) == ("diffusers", 4, 2)
  assert ae["scaling_factor"] == pytest.approx(0.18215)

  records = metrics.read_metrics(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, TOTAL + 1))  # continuous across the resume
  assert all(np.isfinite(r["loss"]) and r["images"] > 0 and r["text_tokens"] > 0 for r in train)
  evals = [r for r in records if "eval_ppl_text" in r]
  assert [r["step"] for r in evals] == [STOP, TOTAL]  # a run evaluates at its last step too
  assert np.isfinite(evals[0]["eval_ppl_text"]) and "eval_caption_exact_match" in evals[0]

  proc = _run(["tfx.evaluate", f"--workdir={workdir}", "--num=4", "--num_heldout=0", "--steps", "2",
               "--batch_size=4", "--text_records=4", "--caption_tokens=8"],
              env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  assert f"wrote {workdir / 'eval' / f'{TOTAL}.json'}" in proc.stdout
  result = json.loads((workdir / "eval" / f"{TOTAL}.json").read_text())
  assert np.isfinite(result["metrics"]["ppl_text"]) and np.isfinite(result["metrics"]["ppl_caption_given_image"])
