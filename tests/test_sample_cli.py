"""`python -m tfx.sample` end to end against a tiny checkpoint trained here."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data_testing
from tfx import sample, trainer
from tfx.data import shapes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  c = data_testing.sampling_config()
  c.sample_every_steps = 2                           # the trainer draws a sample grid at the end
  c.sample_prompts = ("a red circle", "two blue squares")
  wd = str(tmp_path_factory.mktemp("sample_cli") / "run")
  trainer.run(c, wd)
  return wd


def test_training_writes_sample_grids(workdir):
  grids = sorted(pathlib.Path(workdir, "samples").glob("text_to_image_*.png"))
  assert [g.name for g in grids] == ["text_to_image_00000002.png"]
  with Image.open(grids[0]) as im:
    res = json.loads(pathlib.Path(workdir, "config.json").read_text())["image"]["resolution"]
    assert im.size == (4 * res + 10, 2 * res + 6)  # 4 samples per prompt, 2 prompts, 2 px gutters


def run_cli(args, capsys):
  code = sample.main(args)
  out, err = capsys.readouterr()
  return code, out, err


def test_prompt_writes_pngs_and_grid(workdir, tmp_path, capsys):
  out = tmp_path / "imgs"
  code, _, err = run_cli(["--workdir", workdir, "--prompt", "a red circle", "--num", "3", "--out", str(out),
                          "--seed", "1", "--cfg_scale", "2.5", "--sampler", "ddpm"], capsys)
  assert code == 0, err
  assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "grid.png"]
  assert np.asarray(Image.open(out / "00000.png")).shape == (16, 16, 3)
  assert "images 3/3" in err
  # guidance limited to an interval of noise levels draws other images from the same noise
  code, _, err = run_cli(["--workdir", workdir, "--prompt", "a red circle", "--num", "1", "--out", str(out / "gi"),
                          "--seed", "1", "--cfg_scale", "2.5", "--sampler", "ddpm", "--cfg_interval", "0.4", "0.6"],
                         capsys)
  assert code == 0, err
  assert not np.array_equal(np.asarray(Image.open(out / "gi" / "00000.png")), np.asarray(Image.open(out / "00000.png")))
  # so does clipping each step's predicted x0 (an untrained model's overshoots)
  code, _, err = run_cli(["--workdir", workdir, "--prompt", "a red circle", "--num", "1", "--out", str(out / "clip"),
                          "--seed", "1", "--cfg_scale", "2.5", "--sampler", "ddpm", "--clip_x0", "1"], capsys)
  assert code == 0, err
  assert not np.array_equal(np.asarray(Image.open(out / "clip" / "00000.png")), np.asarray(Image.open(out / "00000.png")))
  # never overwrites: the same folder again is refused and the files stay
  before = (out / "00000.png").read_bytes()
  code, _, err = run_cli(["--workdir", workdir, "--prompt", "x", "--num", "1", "--out", str(out)], capsys)
  assert code == 2 and "already holds 00000.png" in err and (out / "00000.png").read_bytes() == before


def test_prompts_file_writes_manifest_in_batches(workdir, tmp_path, capsys):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n\ntwo blue squares\na green triangle\n")
  out = tmp_path / "many"
  code, _, err = run_cli(["--workdir", workdir, "--prompts_file", str(prompts), "--out", str(out),
                          "--batch_size", "2", "--steps", "2", "--temperature", "0"], capsys)
  assert code == 0, err
  lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
  assert [x["prompt"] for x in lines] == ["a red circle", "two blue squares", "a green triangle"]
  assert all((out / x["file"]).is_file() for x in lines)
  assert "images 2/3" in err and "images 3/3" in err


def test_image_captions_print_json_lines(workdir, tmp_path, capsys):
  rng = np.random.default_rng(0)
  paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
  for p in paths:
    Image.fromarray(shapes.render(shapes.sample_spec(rng))).save(p)
  code, out, err = run_cli(["--workdir", workdir, "--image", *map(str, paths), "--max_tokens", "5"], capsys)
  assert code == 0, err
  rows = [json.loads(x) for x in out.splitlines()]
  assert [r["image"] for r in rows] == list(map(str, paths))
  assert all(isinstance(r["caption"], str) for r in rows)


def test_long_prompt_is_cut_like_training_and_long_captions_refused(workdir, tmp_path, capsys):
  long = "a red circle " * 7700   # 100k characters: ran 125 s and 16.7 GB before prompts were cut
  code, _, err = run_cli(["--workdir", workdir, "--prompt", long, "--num", "1", "--out", str(tmp_path / "o"),
                          "--steps", "2"], capsys)
  assert code == 0, err
  assert "1 prompt(s) cut to data.max_caption_tokens=64 tokens" in err
  code, _, err = run_cli(["--workdir", workdir, "--image", str(tmp_path / "o" / "00000.png"),
                          "--max_tokens", "1000"], capsys)
  assert code == 2 and "--max_tokens 1000 exceeds the model's context (seq_len 96)" in err


def test_interleaved_writes_the_document(workdir, tmp_path, capsys):
  Image.fromarray(shapes.render(shapes.sample_spec(np.random.default_rng(1)))).save(tmp_path / "a.png")
  prompt = tmp_path / "prompt.json"
  prompt.write_text(json.dumps([{"text": "a red circle"}, {"image": "a.png"}, {"text": "two"}]))
  out = tmp_path / "doc"
  code, _, err = run_cli(["--workdir", workdir, "--interleaved", str(prompt), "--out", str(out), "--max_tokens", "6",
                          "--max_images", "1", "--steps", "2"], capsys)
  assert code == 0, err
  lines = [json.loads(x) for x in (out / "document.jsonl").read_text().splitlines()]
  assert lines[:3] == [{"text": "a red circle", "generated": False},
                       {"image": str(tmp_path / "a.png"), "generated": False}, {"text": "two", "generated": False}]
  new = lines[3:]
  assert new and all(x["generated"] for x in new)
  images = [x["image"] for x in new if "image" in x]
  assert sorted(os.listdir(out)) == sorted(images + ["document.jsonl"])
  for bad, message in (('[{"text": 1}]', "piece 0"), ('{"text": "a"}', "non-empty JSON list"),
                       ('[{"image": "missing.png"}]', "cannot read image")):
    prompt.write_text(bad)
    code, _, err = run_cli(["--workdir", workdir, "--interleaved", str(prompt), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_bad_input_exits_2_with_one_line(workdir, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  code, _, err = run_cli(["--workdir", str(empty), "--prompt", "a", "--out", str(tmp_path / "o")], capsys)
  assert code == 2 and "config.json" in err and len(err.strip().splitlines()) == 1
  bad = tmp_path / "bad.png"
  bad.write_text("not an image")
  code, _, err = run_cli(["--workdir", workdir, "--image", str(bad)], capsys)
  assert code == 2 and "cannot read image" in err and str(bad) in err
  blank = tmp_path / "blank.txt"
  blank.write_text("\n  \n")
  code, _, err = run_cli(["--workdir", workdir, "--prompts_file", str(blank), "--out", str(tmp_path / "o")],
                         capsys)
  assert code == 2 and "holds no prompt" in err
  code, _, err = run_cli(["--workdir", workdir, "--prompt", "a", "--out", str(blank)], capsys)
  assert code == 2 and "not a folder" in err and blank.read_text() == "\n  \n"
  for argv in (["--workdir", workdir, "--prompt", "  ", "--out", "o"],   # empty prompt
               ["--workdir", workdir, "--out", "o"],                     # no mode
               ["--workdir", workdir, "--prompt", "a"],                  # no --out
               ["--workdir", workdir, "--prompt", "a", "--out", "o", "--cfg_interval", "1", "0"],
               ["--workdir", workdir, "--prompt", "a", "--out", "o", "--clip_x0", "nan"],
               ["--workdir", workdir, "--prompt", "a", "--out", "o", "--best_of", "0"]):
    with pytest.raises(SystemExit) as e:
      sample.parse_args(argv)
    assert e.value.code == 2
  assert not (tmp_path / "o").exists()


def test_entry_point_exit_code(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "tfx.sample", "--workdir", str(tmp_path), "--prompt", "a",
                         "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("tfx.sample: error: no config.json")


MESHES = ["data=2,fsdp=2,tensor=2", "fsdp=8"]  # batch 4: rows split 4 ways, then replicated (8 > 4)


@pytest.fixture(scope="module")
def one_device_outputs(workdir):
  """Float images (before uint8 rounding) and greedy captions from the unsharded model."""
  from tfx import generate, restore
  return _generate(generate.Generator(*restore.restore_model(workdir)))


def _generate(gen):
  import unittest.mock
  from tfx import generate
  from tfx.generation import engine
  prompts = ["a red circle", "two blue squares", "a green triangle", "a red circle"]
  with unittest.mock.patch.object(engine, "to_uint8", lambda x: np.asarray(x, np.float32)):
    images = gen.text_to_image(prompts, seed=3, steps=2, cfg_scale=2.5, sampler="ddpm", batch_size=4)
  captions = gen.caption(generate.to_uint8(images), max_tokens=6, batch_size=4)
  return images, captions


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_generation_matches_one_device(workdir, one_device_outputs, spec):
  import jax
  from jax.sharding import NamedSharding
  from tfx import generate, mesh, restore
  device_mesh = mesh.make_mesh(restore.parse_mesh(spec))
  with jax.set_mesh(device_mesh):
    config, model = restore.restore_model(workdir, mesh=device_mesh)
    q = model.blocks[0].attn.q.kernel.get_value()
    assert len(q.sharding.device_set) == 8 and q.sharding.spec == mesh.logical_to_spec(("embed", "heads", None))
    assert q.addressable_shards[0].data.shape[0] == config.model.d_model // device_mesh.shape["fsdp"]
    gen = generate.Generator(config, model)
    k = gen._empty_cache(4, 64).k_NBSGK  # [N, B, S, G, K]
    rows = "act_batch" if 4 % (device_mesh.shape["data"] * device_mesh.shape["fsdp"]) == 0 else None
    want = NamedSharding(device_mesh, mesh.logical_to_spec(("layers", rows, "act_len", "act_heads", "act_kv")))
    assert k.sharding.is_equivalent_to(want, k.ndim), k.sharding
    images, captions = _generate(gen)
  want_images, want_captions = one_device_outputs
  # fp32 sums in another order (sharded matmuls reduce over devices); the two ddpm steps of a barely
  # trained model blow values up to ~5e4 (x0 = x / sqrt(alpha_bar) at t ~ T), so the tolerance is
  # relative to the images' scale (measured on data=2,fsdp=2,tensor=2: 1.2e-6 of it)
  scale = np.abs(want_images).max()
  np.testing.assert_allclose(images / scale, want_images / scale, atol=1e-5)
  assert captions == want_captions and any(captions)


def test_mesh_flag_samples_and_captions_like_one_device(workdir, tmp_path, capsys):
  out = {}
  for name, extra in (("one", []), ("mesh", ["--mesh", "data=2,fsdp=-1"])):
    code, _, err = run_cli(["--workdir", workdir, "--prompt", "a red circle", "--num", "2", "--steps", "2",
                            "--out", str(tmp_path / name), *extra], capsys)
    assert code == 0, err
    code, lines, err = run_cli(["--workdir", workdir, "--image", str(tmp_path / name / "00000.png"),
                                "--max_tokens", "5", *extra], capsys)
    assert code == 0, err
    out[name] = (np.asarray(Image.open(tmp_path / name / "grid.png"), np.int16), json.loads(lines)["caption"])
  assert np.abs(out["one"][0] - out["mesh"][0]).max() <= 1  # uint8 rounding of ~1e-6 differences
  assert out["one"][1] == out["mesh"][1]


def test_bad_mesh_exits_2_with_one_line(workdir, tmp_path, capsys):
  for bad in ("fsdp", "pipeline=2", "data=0", "data=-1,fsdp=-1", "fsdp=x"):
    with pytest.raises(SystemExit) as e:
      sample.parse_args(["--workdir", workdir, "--prompt", "a", "--out", "o", "--mesh", bad])
    assert e.value.code == 2 and "argument --mesh: " in capsys.readouterr().err
  for bad, message in (("fsdp=3", "devices"), ("tensor=8", "do not divide")):  # 8 devices; 2 heads
    code, _, err = run_cli(["--workdir", workdir, "--prompt", "a", "--out", str(tmp_path / "o"), "--mesh", bad],
                           capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
