"""Autoencoders: diffusers parity, loader errors, the pixels identity, the tfx VAE, latent caching."""
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from tfx import config as config_lib
from tfx import mesh as tfx_mesh
from tfx import autoencoder
from tfx.autoencoder import diffusers

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _rel_err(a, b) -> float:
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=["sd", "flux"])
def diffusers_case(request):
  variant = request.param
  return (diffusers.load(str(FIXTURES / f"diffusers_vae_{variant}")),
          np.load(FIXTURES / f"diffusers_vae_{variant}_io.npz"))


def test_diffusers_parity_with_torch(diffusers_case):
  ae, io = diffusers_case
  assert _rel_err(ae.encode(io["images"]), io["mean"]) < 1e-4
  assert _rel_err(ae.decode(io["mean"]), io["decoded"]) < 1e-4


def test_diffusers_reads_factors_from_config_json():
  ae = diffusers.load(str(FIXTURES / "diffusers_vae_flux"))
  assert (ae.scaling_factor, ae.shift_factor, ae.downsample, ae.latent_channels) == (0.3611, 0.1159, 4, 4)
  z = np.linspace(-1, 1, 2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
  np.testing.assert_allclose(ae.from_diffusion(ae.to_diffusion(z)), z, atol=1e-6)


def _copy_fixture(tmp_path, variant="sd") -> pathlib.Path:
  folder = tmp_path / variant
  shutil.copytree(FIXTURES / f"diffusers_vae_{variant}", folder)
  return folder


def test_diffusers_rejects_mismatched_config(tmp_path):
  folder = _copy_fixture(tmp_path)
  raw = json.loads((folder / "config.json").read_text())
  raw["block_out_channels"] = [8, 32]
  (folder / "config.json").write_text(json.dumps(raw))
  with pytest.raises(autoencoder.AutoencoderError, match="do not match config.json.*shape"):
    diffusers.load(str(folder))


def test_diffusers_rejects_missing_quant_conv(tmp_path):
  folder = _copy_fixture(tmp_path, "flux")
  raw = json.loads((folder / "config.json").read_text())
  raw["use_quant_conv"] = True
  (folder / "config.json").write_text(json.dumps(raw))
  with pytest.raises(autoencoder.AutoencoderError, match="missing quant_conv"):
    diffusers.load(str(folder))


def test_diffusers_rejects_unsupported_blocks(tmp_path):
  folder = _copy_fixture(tmp_path)
  raw = json.loads((folder / "config.json").read_text())
  raw["down_block_types"][0] = "AttnDownEncoderBlock2D"
  (folder / "config.json").write_text(json.dumps(raw))
  with pytest.raises(autoencoder.AutoencoderError, match="AttnDownEncoderBlock2D"):
    diffusers.load(str(folder))


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "vae.pth", "model.ckpt"])
def test_pickle_checkpoints_are_refused(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(b"not loaded")
  with pytest.raises(autoencoder.AutoencoderError, match="never loaded.*safetensors"):
    diffusers.load(str(path))


def test_folder_with_only_a_bin_is_refused(tmp_path):
  folder = tmp_path / "old"
  folder.mkdir()
  (folder / "config.json").write_text("{}")
  (folder / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(autoencoder.AutoencoderError, match="missing diffusion_pytorch_model.safetensors.*bin"):
    diffusers.load(str(folder))


def _config(**ae):
  c = config_lib.default()
  c.autoencoder.update(ae)
  return c


def test_load_checks_config_against_weights():
  path = str(FIXTURES / "diffusers_vae_sd")
  good = _config(kind="diffusers", path=path, latent_channels=4, downsample=2, scaling_factor=0.18215)
  assert autoencoder.load(good).latent_channels == 4
  with pytest.raises(autoencoder.AutoencoderError, match="autoencoder.downsample=2"):
    autoencoder.load(_config(kind="diffusers", path=path, latent_channels=4, scaling_factor=0.18215))
  with pytest.raises(autoencoder.AutoencoderError, match="scaling_factor=0.18215"):
    autoencoder.load(_config(kind="diffusers", path=path, latent_channels=4, downsample=2))
  with pytest.raises(autoencoder.AutoencoderError, match="not one of"):
    autoencoder.load(_config(kind="vqgan"))
  with pytest.raises(autoencoder.AutoencoderError, match="needs autoencoder.path"):
    autoencoder.load(_config(kind="diffusers"))


def test_pixels_is_identity():
  ae = autoencoder.load(config_lib.default())
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(ae.encode(x), x)
  np.testing.assert_array_equal(ae.decode(ae.encode(x)), x)
  with pytest.raises(autoencoder.AutoencoderError, match=r"\[B, H, W, 3\]"):
    ae.encode(x[..., :2])


# -- latent caching -------------------------------------------------------------------

def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def latent_configs(tmp_path_factory):
  """(pixels config, latent-cache config) that pack identical records: 16 patches per image."""
  from data_testing import small_config
  from tfx.autoencoder import cache_latents

  pixels = small_config()  # 16 px images, 4x4 pixel patches
  latents = small_config()
  latents.autoencoder.update(kind="diffusers", path=str(FIXTURES / "diffusers_vae_sd"), latent_channels=4,
                             downsample=2, scaling_factor=0.18215)
  latents.image.patch_size = 2  # 8x8 latents
  out = tmp_path_factory.mktemp("cache") / "latents"
  counts = cache_latents.cache(latents, str(out), batch_size=50)
  assert counts["train"] == pixels.data.shapes_train_size
  latents.data.image_text = str(out)
  return pixels, latents


def test_cached_latent_batches_equal_encoding_on_the_fly(latent_configs):
  from tfx import patching, record
  from tfx.data import pipeline

  pixels, latents = latent_configs
  ae = autoencoder.load(latents)
  for b_pix, b_lat in zip(_take(pipeline.make_iterator(pixels, process_index=0, process_count=1), 3),
                          _take(pipeline.make_iterator(latents, process_index=0, process_count=1), 3)):
    for k in record.FIELDS:
      if k != "patches":
        np.testing.assert_array_equal(b_pix[k], b_lat[k], err_msg=k)
    image = b_pix["modality"] == record.IMAGE
    assert image.sum() >= 16
    grids = patching.unpatchify(b_pix["patches"][image].reshape(-1, 16, 48), 4, 3)  # the pixel images
    on_the_fly = patching.patchify(np.asarray(ae.to_diffusion(ae.encode(grids))), 2)
    np.testing.assert_allclose(b_lat["patches"][image].reshape(-1, 16, 16), on_the_fly, rtol=1e-4, atol=1e-5)


def test_cache_refuses_to_overwrite_and_pixels(latent_configs, tmp_path):
  from tfx.autoencoder import cache_latents

  pixels, latents = latent_configs
  (tmp_path / "keep.txt").write_text("user data")
  config = latents.copy_and_resolve_references()
  config.data.image_text = "shapes"
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    cache_latents.cache(config, str(tmp_path))
  assert (tmp_path / "keep.txt").read_text() == "user data"
  with pytest.raises(autoencoder.AutoencoderError, match="no latents to cache"):
    cache_latents.cache(pixels, str(tmp_path / "new"))
  with pytest.raises(autoencoder.AutoencoderError, match="no `image` feature"):
    cache_latents.cache(latents, str(tmp_path / "new"))


# -- the tfx VAE ------------------------------------------------------------------------

def _vae_config(steps: int):
  from data_testing import small_config

  c = small_config()
  # One level (no resampling) and no attention: the smallest graph, so the sharded step compiles fast.
  c.autoencoder.update(kind="vae", latent_channels=4, downsample=1, vae_channels=(8,), vae_norm_groups=4,
                       vae_mid_attention=False, train_steps=steps, train_batch_size=8, eval_images=8)
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  return c


def test_train_autoencoder_runs_saves_loads_and_resumes(tmp_path):
  from tfx import metrics
  from tfx import train_autoencoder
  from tfx.autoencoder import quality, vae

  quiet = lambda *_: None
  straight = train_autoencoder.run(_vae_config(3), str(tmp_path / "b"), log=quiet)
  shutil.copytree(tmp_path / "b", tmp_path / "a")
  shutil.rmtree(tmp_path / "a" / "checkpoints" / "3")  # as if killed after the step-2 checkpoint
  resumed = train_autoencoder.run(_vae_config(3), str(tmp_path / "a"), log=quiet)
  assert (straight["start_step"], resumed["start_step"]) == (0, 2)
  loss = lambda w: [r["loss"] for r in metrics.read_metrics(tmp_path / w)]
  assert len(loss("a")) == 3 and np.allclose(loss("a"), loss("b"), rtol=1e-5)  # resume is exact
  assert resumed["psnr_db"] == pytest.approx(straight["psnr_db"], abs=1e-3)

  meta = vae.read_metadata(tmp_path / "b")
  config = _vae_config(3)
  config.autoencoder.update(path=str(tmp_path / "b"), scaling_factor=meta["scaling_factor"],
                            shift_factor=meta["shift_factor"])
  ae = autoencoder.load(config)
  test_images, captions = train_autoencoder.read_images(train_autoencoder.open_images(config, "test"), range(8), 16)
  assert quality.evaluate(ae, test_images, captions)["psnr_db"] == pytest.approx(straight["psnr_db"], abs=1e-3)
  latents = quality.batched(ae.encode, quality.to_unit(test_images))
  assert latents.shape == (8, 16, 16, 4) and quality.batched(ae.decode, latents).shape == (8, 16, 16, 3)
  with jax.set_mesh(tfx_mesh.make_mesh(config.mesh)):  # as sample grids load it during training
    in_mesh = autoencoder.load(config)
  np.testing.assert_allclose(quality.batched(in_mesh.encode, quality.to_unit(test_images)), latents, atol=1e-5)


def test_vae_config_errors():
  from tfx.autoencoder import vae

  c = _vae_config(1)
  c.autoencoder.downsample = 4
  with pytest.raises(autoencoder.AutoencoderError, match="downsample by 1.*autoencoder.downsample=4"):
    vae.net_config(c)
  with pytest.raises(autoencoder.AutoencoderError, match="no autoencoder.json"):
    vae.load("/nonexistent/vae")


def test_psnr_and_scorer_rates():
  from tfx.autoencoder import quality
  from tfx.data import shapes

  rng = np.random.default_rng(0)
  specs = [shapes.sample_spec(rng) for _ in range(4)]
  images = np.stack([shapes.render(s, 32) for s in specs])
  captions = [shapes.caption(s) for s in specs]
  exact = quality.evaluate(autoencoder.PixelAutoencoder(), images, captions)
  assert exact["psnr_db"] > 90 and exact["scorer_ratio"] == 1.0
  a = rng.integers(20, 236, (2, 8, 8, 3)).astype(np.uint8)
  b = (a + rng.choice([-8, 8], a.shape)).astype(np.uint8)  # mse exactly 64
  np.testing.assert_allclose(quality.psnr_db(a, b), 10 * np.log10(255 ** 2 / 64))


def test_command_line_misuse_exits_2():
  import subprocess
  import sys

  root = pathlib.Path(__file__).parent.parent
  args = ["--config=experiments/shapes_vae.py", "--batch_size=0", "--output=/tmp/unused"]
  proc = subprocess.run([sys.executable, "-m", "tfx.autoencoder.cache_latents", *args], cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == "tfx.autoencoder.cache_latents: error: --batch_size must be >= 1, got 0"


def test_diffusers_legacy_attention_names(tmp_path):
  """Old checkpoints name the mid-block attention query/key/value/proj_attn, as 1x1 convs."""
  from safetensors.numpy import load_file, save_file

  folder = _copy_fixture(tmp_path)
  weights = folder / diffusers.WEIGHTS_NAME
  tensors = load_file(str(weights))
  legacy = {}
  for key, value in tensors.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        value = value[:, :, None, None] if value.ndim == 2 else value
    legacy[key] = value
  save_file(legacy, str(weights))
  io = np.load(FIXTURES / "diffusers_vae_sd_io.npz")
  ae = diffusers.load(str(folder))
  assert _rel_err(ae.decode(io["mean"]), io["decoded"]) < 1e-4


def test_diffusers_bfloat16_weights(tmp_path):
  import ml_dtypes
  from safetensors.numpy import load_file
  from safetensors.flax import save_file
  import jax.numpy as jnp

  folder = _copy_fixture(tmp_path, "flux")
  weights = folder / diffusers.WEIGHTS_NAME
  save_file({k: jnp.asarray(v.astype(ml_dtypes.bfloat16)) for k, v in load_file(str(weights)).items()},
            str(weights))
  io = np.load(FIXTURES / "diffusers_vae_flux_io.npz")
  assert _rel_err(diffusers.load(str(folder)).encode(io["images"]), io["mean"]) < 3e-2  # bf16 rounding
