"""experiments/transfusion.py (the paper's setups) and the --dry_run report (tfx/dryrun.py)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfx import dryrun
from tfx.model import build_model, presets

from train_helpers import experiment_config, load_experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


EXPERIMENT = load_experiment("transfusion")


def _abstract_params(config) -> int:
  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("size", EXPERIMENT.SIZES)
def test_paper_sizes_match_table_2(size):
  config = EXPERIMENT.get_config(f"size={size}")
  n = _abstract_params(config)
  assert abs(n - presets.PAPER_SIZES[size]) / presets.PAPER_SIZES[size] < 0.05, (size, n)


def test_paper_recipe():
  c = EXPERIMENT.get_config("size=0.76B,encoder=linear,patch=2,image_text=/d/coco_latents,tokenizer=/t.model")
  assert c.seq_len * c.global_batch_size == 2 * 1024 * 1024 and c.seq_len == 4096
  assert (c.optim.lr, c.optim.warmup_steps, c.optim.end_lr, c.optim.b2, c.optim.weight_decay) == (
      3e-4, 4000, 1.5e-5, 0.95, 0.1)
  assert c.total_steps == 250_000 and c.diffusion.loss_weight == 5.0 and c.diffusion.noise_limit == 500
  assert c.data.caption_first_fraction == 0.8
  assert (c.image.resolution // c.autoencoder.downsample, c.autoencoder.latent_channels, c.image.patch_size) == (
      32, 8, 2)
  assert c.data.image_text == "/d/coco_latents" and c.data.tokenizer == "/t.model"
  # 1:1 tokens: weights are shares of positions; patches must be half of them
  pair_positions = 256 + 2 + EXPERIMENT.CAPTION_TOKENS
  image_tokens = c.data.image_text_weight * 256 / pair_positions
  assert c.data.image_text_weight + c.data.text_weight == pytest.approx(1.0)
  assert image_tokens == pytest.approx(0.5, abs=1e-3)


def test_unet_is_about_a_quarter_billion_params_at_every_patch_size():
  for patch in (2, 4, 8):
    with_unet = _abstract_params(EXPERIMENT.get_config(f"size=0.16B,encoder=unet,patch={patch}"))
    linear = _abstract_params(EXPERIMENT.get_config(f"size=0.16B,encoder=linear,patch={patch}"))
    assert 0.24e9 < with_unet - linear < 0.30e9, (patch, with_unet - linear)


@pytest.mark.parametrize("arg, message", [
    ("size=3B", "unknown size '3B'"),
    ("", "unknown size ''"),
    ("size=7B,encoder=vit", "unknown encoder 'vit'"),
    ("size=7B,patch=3", "unknown patch '3'"),
    ("size=7B,lr=1", "bad argument 'lr=1'"),
])
def test_bad_experiment_arguments(arg, message):
  with pytest.raises(ValueError, match=message):
    EXPERIMENT.get_config(arg)


@pytest.fixture(scope="module")
def small_report():
  """The smallest paper size at full sequence length, on 4 of the 8 simulated devices."""
  config = EXPERIMENT.get_config("size=0.16B")
  config.global_batch_size = 4
  before = len(jax.live_arrays())
  report = dryrun.report(config, num_devices=4)
  return config, report, len(jax.live_arrays()) - before


def test_dry_run_reports_the_paper_model_without_allocating(small_report):
  config, report, new_arrays = small_report
  assert new_arrays == 0  # abstract all the way: no parameter was materialized
  assert report["params"] == _abstract_params(config)
  assert report["mesh"]["shape"] == {"data": 1, "fsdp": 4, "tensor": 1} and report["mesh"]["devices"] == 4
  assert report["tokens_per_step"] == 4 * 4096 and report["sequences_per_device"] == 1
  # training FLOPs: at least the dense 6N, plus attention over 4096 tokens
  assert report["flops_per_token"] > 6 * report["params"] * 0.9
  assert report["flops_per_step"] == pytest.approx(report["flops_per_token"] * 4 * 4096)
  json.dumps(report)


def test_dry_run_memory_comes_from_the_compiled_step(small_report):
  config, report, _ = small_report
  mem = report["memory_per_device"]
  assert mem["total_gib"] == pytest.approx(mem["arguments_gib"] + mem["outputs_gib"] - mem["aliased_gib"]
                                           + mem["temp_gib"], abs=0.01)
  # fp32 params + two Adam moments, FSDP over 4 devices, are the step's arguments
  assert mem["arguments_gib"] >= 3 * 4 * report["params"] / 4 / 1024 ** 3
  assert mem["aliased_gib"] > 0  # the donated state is updated in place
  assert mem["temp_gib"] > 0 and mem["fits"] == {"H100 (80 GB)": True, "v5p (95 GB)": True}


def test_timed_steps_run_the_compiled_step_on_random_records():
  """--time_steps materializes the state and times the real step (the tiny shapes model, 2 devices)."""
  config = experiment_config("shapes", "tiny")
  report = dryrun.report(config, num_devices=2, time_steps=2)
  measured = report["measured"]
  assert measured["steps"] == 2 and 0 < measured["step_seconds_min"] <= measured["step_seconds_median"]
  assert measured["tokens_per_sec"] == pytest.approx(8 * 96 / measured["step_seconds_median"], rel=0.02)
  assert np.isfinite(measured["loss"]) and measured["loss"] > 1.0  # real records, not all padding
  assert "mfu" not in measured  # no peak FLOP/s is known for CPUs
  json.dumps(report)


def test_random_records_fill_long_rows_with_large_images():
  """Rows are never left empty when max_images images would not fit (the paper's 256-patch images)."""
  from tfx import record
  batch = record.random_batch(np.random.default_rng(0), 8, 1024, 256, 32, 32000, max_images=16)
  assert (batch["segment_ids"] > 0).any(axis=1).all()
  images_per_row = (batch["modality"] == record.IMAGE).sum(axis=1) // 256
  assert images_per_row.max() == 3 and (images_per_row > 0).sum() >= 6


def test_too_few_devices_or_an_unsplittable_batch_is_a_clear_error():
  with pytest.raises(dryrun.DryRunError, match="xla_force_host_platform_device_count=4096"):
    dryrun.report(EXPERIMENT.get_config("size=0.16B"), num_devices=4096)
  config = EXPERIMENT.get_config("size=0.16B")
  config.global_batch_size = 6
  with pytest.raises(dryrun.DryRunError, match="global_batch_size 6 is not divisible by the 4-way"):
    dryrun.report(config, num_devices=4)


def test_cli_misuse_exits_2():
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "tfx.dryrun", "--config=experiments/transfusion.py:size=0.16B"]
  for extra, message in [(["--config.mesh.fsdp=3", "--num_devices=16"], "tfx.dryrun: mesh:"),
                         (["--bogus=1"], "tfx.dryrun: Unknown command line flag 'bogus'"),
                         (["--time_steps=-1"], "tfx.dryrun: --time_steps must be >= 0")]:
    bad = subprocess.run(base + extra, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(message), bad.stderr


def test_query_blocked_attention_matches_dense():
  """Long sequences attend block by block (what lets 7B fit); same values and gradients as dense."""
  from tfx.model import attention
  L = 2 * attention.QUERY_BLOCK
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, L, 4, 8)), jnp.float32) for _ in range(3))
  k, v = k[:, :, :2], v[:, :, :2]  # grouped KV heads
  segment = jnp.asarray(np.repeat([[1, 2, 0], [1, 1, 1]], [600, 400, L - 1000], axis=1), jnp.int32)
  image_ids = jnp.zeros_like(segment).at[:, 100:356].set(1)
  modality = (image_ids > 0).astype(jnp.int32)
  mask = attention.dense_mask(segment, attention.horizon(image_ids, modality), segment)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v, mask)))

  blocked = jax.value_and_grad(lambda *a: loss(attention.dot_attention, *a), argnums=(0, 1, 2))(q, k, v)
  dense = jax.value_and_grad(lambda *a: loss(attention._dense_attention, *a), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(blocked[0], dense[0], rtol=1e-5)
  for got, want in zip(blocked[1], dense[1]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # the [.., L, L] fp32 scores never exist: only [.., QUERY_BLOCK, L] blocks inside a loop
  jaxpr = str(jax.make_jaxpr(lambda *a: attention.dot_attention(*a, mask))(q, k, v))
  assert f"f32[2,2,2,{attention.QUERY_BLOCK},{L}]" in jaxpr and f"f32[2,2,2,{L},{L}]" not in jaxpr


def test_timed_records_are_packed_full_like_the_configs_mix():
  """dryrun.random_batch: rows full but for a pair that did not fit, images at about the
  config's share of positions and never past the per-record cap, whole images only."""
  config = experiment_config("transfusion", "size=0.16B")
  config.global_batch_size = 16
  config.model.vocab_size = 32128
  batch = dryrun.random_batch(config, np.random.default_rng(0))
  n = 256
  is_image = batch["modality"] == 1
  share = config.data.image_text_weight / (config.data.image_text_weight + config.data.text_weight)
  pair_share = (is_image.sum() * (n + 2 + 32) / n) / batch["segment_ids"].astype(bool).sum()
  assert abs(pair_share - share) < 0.1
  assert (batch["segment_ids"] == 0).mean() < 0.05
  assert batch["image_ids"].max(axis=1).max() <= config.image.max_images_per_seq
  for row_ids, row_image in zip(batch["image_ids"], is_image):
    counts = np.bincount(row_ids[row_image])[1:]
    assert np.all(counts == n)
