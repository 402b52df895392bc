"""The Chameleon baseline: the VQ tokenizer trains by tfx.train_autoencoder (loss down, dead codes
restarted, usage in autoencoder.json), loads with autoencoder.kind="vq", and its codes round-trip;
model.image_mode="discrete" trains on its cached codes under a plain causal mask, resumes, samples
valid codes with guidance and evaluates. One tokenizer serves the whole module (one compile)."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfx import autoencoder, metrics, train_autoencoder
from tfx.autoencoder import vq

STEPS = 150


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """The resumed run's train step and the CLIs' generation kernels are programs compiled before."""
  from train_helpers import persistent_compile_cache
  with persistent_compile_cache(tmp_path_factory.mktemp("jax_cache")):
    yield


def vq_config(steps: int):
  """A tiny VQ (f = 2, 16 codes of 4 dims) on the small shapes data: the tests' tokenizer."""
  from data_testing import small_config

  c = small_config()
  c.autoencoder.update(kind="vq", latent_channels=4, downsample=2, vae_channels=(8, 8), vae_norm_groups=4,
                       vae_mid_attention=False, codebook_size=16, train_steps=steps, train_batch_size=8,
                       eval_images=16, train_lr=3e-3)
  c.log_every_steps = 1
  c.checkpoint_every_steps = 0
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vq")
  results = train_autoencoder.run(vq_config(STEPS), str(workdir), log=lambda *_: None)
  return workdir, results


def test_loss_goes_down_and_usage_is_reported(trained):
  workdir, results = trained
  records = metrics.read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  # every code starts at usage 1.0 = vq_dead_threshold, so the codes step 1 misses restart
  assert records[0]["restarted"] > 0
  first, last = np.mean([r["loss"] for r in records[:3]]), np.mean([r["loss"] for r in records[-3:]])
  assert last < 0.8 * first, (first, last)
  meta = json.loads((workdir / "autoencoder.json").read_text())
  assert meta["kind"] == "vq" and meta["vq"]["codebook_size"] == 16
  assert 1.0 <= meta["test"]["perplexity"] <= 16 and 0 < meta["test"]["codes_used"] <= 1
  assert meta["test"]["perplexity"] == pytest.approx(results["perplexity"])
  assert np.isfinite(results["psnr_db"])
  assert autoencoder.describe(str(workdir))["kind"] == "vq"


def test_codes_round_trip_through_the_decoder(trained):
  workdir, _ = trained
  config = vq_config(STEPS)
  config.autoencoder.path = str(workdir)
  ae = autoencoder.load(config)
  from tfx.autoencoder import quality
  uint8, _ = train_autoencoder.read_images(train_autoencoder.open_images(config, "test"), range(16), 16)
  # quality.batched pads to batches of 64: the two encodes share one compile
  codes = quality.batched(ae.encode, quality.to_unit(uint8))
  assert codes.shape == (16, 8, 8) and codes.dtype == np.int32 and codes.min() >= 0 and codes.max() < 16
  decoded = quality.batched(ae.decode, codes)
  assert decoded.shape == (16, 16, 16, 3)
  again = quality.batched(ae.encode, decoded)
  # measured: 81% of the codes come back after 150 steps (16 test images): the decoder's images
  # land in their codes' cells; a broken decode (wrong codebook rows, transposed grid) gives ~1/16
  assert (again == codes).mean() > 0.7, (again == codes).mean()
  with pytest.raises(autoencoder.AutoencoderError, match="int codes"):
    ae.decode(np.zeros((4, 8, 8, 4), np.float32))


@pytest.fixture(scope="module")
def discrete(trained, tmp_path_factory):
  """(config, workdir) of a discrete model trained 1 step, then resumed to 2, on the tokenizer's code cache."""
  from data_testing import sampling_config
  from tfx import trainer
  from tfx.autoencoder import cache_latents

  root = tmp_path_factory.mktemp("chameleon")
  c = vq_config(STEPS)
  c.autoencoder.path = str(trained[0])
  cache_latents.cache(c, str(root / "codes"), batch_size=64)
  config = sampling_config()
  config.autoencoder = c.autoencoder
  config.data.image_text = str(root / "codes")
  config.model.image_mode = "discrete"
  config.diffusion.cfg_scale = 2.0
  workdir = str(root / "run")
  first = trainer.run(dict_copy(config, stop_after_step=1), workdir)
  resumed = trainer.run(config, workdir)
  return config, workdir, first, resumed


def dict_copy(config, **overrides):
  c = config.copy_and_resolve_references()
  c.update(overrides)
  return c


def test_discrete_batches_put_codes_in_the_text_stream_under_a_causal_mask(discrete):
  from tfx.data import pipeline, tokenizer
  from tfx.model import attention
  config, *_ = discrete
  tok = tokenizer.load(config)
  offset = tokenizer.model_vocab_size(config, tok)
  batch = next(pipeline.make_iterator(config))
  assert (batch["modality"] == 0).all() and (batch["image_ids"] == 0).all() and not batch["patches"].any()
  tokens = batch["tokens"]
  boi = np.argwhere(tokens == tok.boi_id)
  assert len(boi) > 0
  for b, i in boi:
    if i + 65 < tokens.shape[1] and batch["segment_ids"][b, i + 65] == batch["segment_ids"][b, i]:
      run = tokens[b, i + 1:i + 65]
      assert ((run >= offset) & (run < offset + 16)).all() and tokens[b, i + 65] == tok.eoi_id
      assert batch["lm_mask"][b, i:i + 65].all()        # BOI -> code 1, ..., code 64 -> EOI are learned
  # the model's mask: every query sees exactly the earlier keys of its segment (image_attention is moot)
  horizon = attention.horizon(batch["image_ids"], batch["modality"], config.model.image_attention)
  seg = batch["segment_ids"]
  mask = np.asarray(attention.dense_mask(seg, horizon, seg))
  L = seg.shape[1]
  causal = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & np.tril(np.ones((L, L), bool))
  assert (mask.reshape(causal.shape) == causal).all()


def test_discrete_training_resumes_and_reports_both_losses(discrete):
  from tfx.model import flops
  config, workdir, first, resumed = discrete
  records = metrics.read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert r["diff_loss"] == 0 and r["images"] == 0 and r["image_tokens"] > 0
    assert np.isfinite(r["text_loss"]) and np.isfinite(r["image_loss"]) and r["image_loss"] > 0
    # lm_loss is the token-weighted mean of the two parts
    text = r["text_tokens"] - r["image_tokens"]
    assert r["lm_loss"] == pytest.approx((r["text_loss"] * text + r["image_loss"] * r["image_tokens"])
                                         / r["text_tokens"], rel=1e-4)
  report = flops.report(config)
  assert report["params_modality"] == 0 and report["modality_flops_per_image_token"] == 0
  assert report["params_lm_head"] == config.model.d_model * (1024 + 16)   # text vocabulary + codebook


def test_sampled_codes_are_valid_and_decode(discrete):
  from tfx import generate, restore
  config, workdir, *_ = discrete
  gen = generate.Generator(*restore.restore_model(workdir))
  pieces = [gen.image_start_piece(gen.caption_ids(p), bos=True) for p in ("a red circle", "two blue squares")]
  logits, cache, lengths, Lp = gen._prefill_prompts(pieces, gen.num_patches)
  from tfx.generation import kernels
  codes = np.asarray(gen.denoise_image(cache, lengths, Lp, 1, kernels.index_keys(0, 0, 2), cfg_scale=2.0,
                                       logits_BV=logits))
  assert codes.shape == (2, 64) and codes.dtype == np.int32 and codes.min() >= 0 and codes.max() < 16
  images = gen.patches_to_images(codes)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  again = gen.text_to_image(["a red circle", "two blue squares"], seed=0, cfg_scale=2.0)
  assert (again == images).all()   # the public path samples the same codes (same keys)


def test_sample_and_evaluate_clis_run_on_a_discrete_checkpoint(discrete, tmp_path):
  import json as json_lib
  from tfx import evaluate, sample
  _, workdir, *_ = discrete
  assert sample.main(["--workdir", workdir, "--prompt", "a red circle", "--num", "2", "--out",
                      str(tmp_path / "out")]) == 0
  assert len(list((tmp_path / "out").glob("0000*.png"))) == 2
  net = untrained_shapesnet(str(tmp_path / "shapesnet.npz"))
  assert evaluate.main(["--workdir", workdir, "--num", "3", "--num_heldout", "0", "--text_records", "2",
                        "--shapesnet", net, "--no_alt", "--batch_size", "2"]) == 0
  result = json_lib.loads((pathlib.Path(workdir) / "eval" / "2.json").read_text())["metrics"]
  assert all(np.isfinite(v) for k, v in result.items() if k.startswith("ppl_")) and "ppl_text" in result


def untrained_shapesnet(path: str) -> str:
  """A 16 px ShapesNet with random weights, written without JAX: evaluate needs one for fd_shapesnet,
  and training one (data_testing.tiny_shapesnet) compiles an initialiser per weight shape (~7 s)."""
  from tfx.data import shapes
  from tfx.eval import shapesnet
  model = nnx.eval_shape(lambda: shapesnet.ShapesNet(
      shapesnet.ShapesNetSpec(16, len(shapes.COMBOS), 4), nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    v.set_value(rng.normal(0, 0.1, v.get_value().shape).astype(np.float32))
  shapesnet.save(model, path)
  return path


def test_dead_codes_restart_at_encoder_outputs():
  """A code under the usage threshold moves onto one of the batch's encoder outputs; live codes take
  the EMA step (numpy reference)."""
  cfg = vq.VQConfig(codebook_size=4, ema_decay=0.9, dead_threshold=0.5)
  rng = np.random.default_rng(1)
  z_ND = rng.normal(size=(6, 3)).astype(np.float32)
  codebook_KD = rng.normal(size=(4, 3)).astype(np.float32)
  codebook_KD[3] = 1e3                                      # never nearest to anything
  usage_K = np.array([2.0, 2.0, 2.0, 0.5], np.float32)      # code 3: 0.9 * 0.5 < 0.5 after this step
  ema_sum_KD = codebook_KD * usage_K[:, None]
  codes_N = np.asarray(vq.nearest(jnp.asarray(z_ND), jnp.asarray(codebook_KD)))
  update = jax.jit(lambda *a: vq.codebook_update(*a, cfg))
  updates, counts_K, dead_K = update(codebook_KD, usage_K, ema_sum_KD, z_ND, codes_N, jax.random.key(0))
  onehot_NK = np.eye(4, dtype=np.float32)[codes_N]
  np.testing.assert_array_equal(counts_K, onehot_NK.sum(0))
  assert np.asarray(dead_K).tolist() == [False, False, False, True]
  new_usage = 0.9 * usage_K + 0.1 * onehot_NK.sum(0)
  new_sum = 0.9 * ema_sum_KD + 0.1 * onehot_NK.T @ z_ND
  np.testing.assert_allclose(updates["usage"][:3], new_usage[:3], rtol=1e-6)
  np.testing.assert_allclose(updates["ema_sum"][:3], new_sum[:3], rtol=1e-5)
  np.testing.assert_allclose(updates["codebook"][:3], new_sum[:3] / new_usage[:3, None], rtol=1e-5)
  restarted = np.asarray(updates["codebook"][3])
  assert np.min(np.abs(z_ND - restarted).max(-1)) == 0      # exactly one of the batch's encoder outputs
  assert float(updates["usage"][3]) == 6 / 4                # as if used evenly: N / K
  np.testing.assert_allclose(updates["ema_sum"][3], restarted * 6 / 4)
