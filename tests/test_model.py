"""The Transfusion model: causality and isolation, scan/remat equivalence, U-Net patch sizes, presets, FLOPs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tfx.config
import tfx.model
from tfx.model import flops, modality, presets

from core_batches import fast_rngs, random_batch

L = 64


def _config(**model):
  c = tfx.config.default()
  presets.apply(c, "tiny")
  c.image.resolution, c.image.patch_size, c.autoencoder.latent_channels = 8, 2, 3  # n=16, P=12
  c.model.update(model)
  return c


_MODELS, _FORWARD = {}, {}


def _model(encoder):
  """A tiny model, built once per encoder for the module (eager init compiles per shape)."""
  if encoder not in _MODELS:
    _MODELS[encoder] = tfx.model.build_model(_config(encoder=encoder), fast_rngs(0))
  return _MODELS[encoder]


def _forward(encoder):
  """(jitted forward, params) of the tiny model."""
  if encoder not in _FORWARD:
    graphdef, params = nnx.split(_model(encoder))
    fn = jax.jit(lambda params, batch, t: nnx.merge(graphdef, params)(batch, t)[:2])
    _FORWARD[encoder] = (fn, params)
  return _FORWARD[encoder]


def _batch():
  """One row: two segments, each with text, an image (16 patches) and more text; then padding."""
  rng = np.random.default_rng(11)
  while True:
    b = random_batch(rng, 1, L, 16, 12, vocab=200, max_images=2, min_segments=2)
    seg, mod = b["segment_ids"][0], b["modality"][0]
    if all(mod[seg == s].any() for s in (1, 2)) and (seg == 0).any() and mod[seg == 1][0] == 0:
      return b


def _run(encoder, batch, t):
  fn, params = _forward(encoder)
  logits, out = fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(t))
  return np.asarray(logits), np.asarray(out)


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_causality_and_isolation(encoder):
  batch = _batch()
  seg, image = batch["segment_ids"][0], batch["modality"][0] == 1
  t = np.where(image, 400.0, 0.0)[None].astype(np.float32)
  logits, out = _run(encoder, batch, t)
  idx = np.arange(L)
  first_image = np.flatnonzero(image & (seg == 1))
  start, end = first_image[0], first_image[-1]

  # a later text token never changes an earlier position
  j = end + 2  # the text after EOI
  assert seg[j] == 1 and not image[j]
  changed = dict(batch, tokens=batch["tokens"].copy())
  changed["tokens"][0, j] = (changed["tokens"][0, j] + 7) % 200
  lo2, out2 = _run(encoder, changed, t)
  np.testing.assert_allclose(lo2[0, idx < j], logits[0, idx < j], atol=1e-6)
  np.testing.assert_allclose(out2[0, idx < j], out[0, idx < j], atol=1e-6)
  assert np.abs(lo2[0, j] - logits[0, j]).max() > 1e-4

  # a patch changes the other patches of its image, nothing before the image, nothing in segment 2
  changed = dict(batch, patches=batch["patches"].copy())
  p = start + 5
  changed["patches"][0, p] += 1.0
  lo3, out3 = _run(encoder, changed, t)
  before = idx < start
  np.testing.assert_allclose(lo3[0, before], logits[0, before], atol=1e-6)
  np.testing.assert_allclose(out3[0, before], out[0, before], atol=1e-6)
  others = image & (seg == 1) & (idx != p)
  assert (np.abs(out3[0, others] - out[0, others]).max(-1) > 1e-6).all()
  second = seg == 2
  np.testing.assert_allclose(lo3[0, second], logits[0, second], atol=1e-6)
  np.testing.assert_allclose(out3[0, second], out[0, second], atol=1e-6)

  # the first token of segment 1 reaches nothing in segment 2
  changed = dict(batch, tokens=batch["tokens"].copy())
  changed["tokens"][0, 0] = (changed["tokens"][0, 0] + 3) % 200
  lo4, out4 = _run(encoder, changed, t)
  np.testing.assert_allclose(lo4[0, second], logits[0, second], atol=1e-6)
  np.testing.assert_allclose(out4[0, second & image], out[0, second & image], atol=1e-6)
  assert np.abs(lo4[0, seg == 1] - logits[0, seg == 1]).max() > 1e-4


def test_linear_patches_know_their_place_in_the_grid():
  """Equal patches get one embedding per (row, column) cell, the same cell in every image,
  counted from each image's first patch (BOI/EOI and back-to-back images alike)."""
  side, n = 3, 9
  enc = modality.LinearPatches(12, 32, 16, grid_side=side, rngs=fast_rngs(0))
  plain = modality.LinearPatches(12, 32, 16, grid_side=0, rngs=fast_rngs(0))
  mod_L = np.array([0] + [1] * n + [0, 0] + [1] * (2 * n) + [0], np.int32)
  offsets = np.concatenate([[0], np.arange(n), [0, 0], np.arange(n), np.arange(n), [0]])
  patches = np.ones((1, len(mod_L), 12), np.float32)
  t = np.full((1, len(mod_L)), 50.0, np.float32)
  x, _ = enc.encode(patches, t, mod_L[None])
  x0, _ = plain.encode(patches, t, mod_L[None])
  table = modality.sincos_2d(side, 32)
  image = mod_L == 1
  np.testing.assert_allclose(np.asarray(x - x0)[0, image], table[offsets[image]], atol=1e-6)
  assert len({tuple(np.round(row, 5)) for row in table}) == n   # every cell distinct
  np.testing.assert_allclose(table[4, :16], table[5, :16], atol=0)   # same row: row half equal
  np.testing.assert_allclose(table[1, 16:], table[4, 16:], atol=0)  # same column: column half equal
  with pytest.raises(ValueError, match="divisible by 4"):
    modality.sincos_2d(side, 30)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_unet_works_for_patch_sizes(k):
  """An 8x8x3 grid as k x k patches: per-image outputs come back in place, images stay separate.
  (Widths as in the tiny preset, so the eager init reuses the U-Net model's compiled shapes.)"""
  n, p_dim = (8 // k) ** 2, k * k * 3
  layers = modality.UNetPatches(patch_size=k, channels=3, grid_side=8 // k, d_model=64, widths=(16, 32),
                                blocks_per_level=1, t_embed_dim=32, max_images=2, rngs=fast_rngs(0))
  graphdef, state = nnx.split(layers)

  @jax.jit
  def run(state, patches, t, modality_BL):
    mod = nnx.merge(graphdef, state)
    x, ctx = mod.encode(patches, t, modality_BL)
    return x, mod.decode(x, ctx)

  length = 2 * n + 3
  mod_L = np.zeros(length, np.int32)
  mod_L[1:1 + n] = 1
  mod_L[2 + n:2 + 2 * n] = 1
  rng = np.random.default_rng(k)
  patches = rng.normal(size=(1, length, p_dim)).astype(np.float32)
  t = np.full((1, length), 300.0, np.float32)
  x, out = run(state, patches, t, mod_L[None])
  assert x.shape == (1, length, 64) and out.shape == (1, length, p_dim)
  patches2 = patches.copy()
  patches2[0, 1] += 1.0  # first image's first patch
  x2, out2 = run(state, patches2, t, mod_L[None])
  second = np.arange(length) >= 2 + n
  np.testing.assert_allclose(out2[0, second], out[0, second], atol=1e-6)
  assert np.abs(out2[0, 1:1 + n] - out[0, 1:1 + n]).max() > 1e-4
  if k == 4:  # the fixed grid embedding lands on the U-Net's patch vectors too, image by image
    with_grid = modality.UNetPatches(patch_size=k, channels=3, grid_side=2, d_model=64, widths=(16, 32),
                                     blocks_per_level=1, t_embed_dim=32, max_images=2, pos_embed=True,
                                     rngs=fast_rngs(0))
    x_grid, _ = with_grid.encode(patches, t, mod_L[None])
    offsets = np.concatenate([[0], np.arange(n), [0], np.arange(n), [0]])
    image = mod_L == 1
    np.testing.assert_allclose(np.asarray(x_grid - x)[0, image], modality.sincos_2d(2, 64)[offsets[image]],
                               atol=1e-5)
  with pytest.raises(ValueError, match="power-of-two"):
    modality.UNetPatches(patch_size=3, channels=3, grid_side=2, d_model=8, widths=(8,), blocks_per_level=1,
                         t_embed_dim=8, max_images=1, rngs=nnx.Rngs(0))


def test_unet_space_to_depth_folds_cells_into_channels_and_keeps_images_apart():
  """space_to_depth puts each 2x2 block's cells in one cell's channels (depth_to_space undoes it);
  a U-Net with the fold runs one level fewer on 12-channel input and still keeps images apart."""
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  folded = np.asarray(modality.space_to_depth(x, 2))
  assert folded.shape == (2, 4, 4, 12)
  np.testing.assert_array_equal(folded[1, 2, 3], x[1, 4:6, 6:8].reshape(-1))
  np.testing.assert_array_equal(np.asarray(modality.depth_to_space(folded, 2, 3)), x)

  n, p_dim = 4, 4 * 4 * 3
  layers = modality.UNetPatches(patch_size=4, channels=3, grid_side=2, d_model=64, widths=(16, 32),
                                blocks_per_level=1, t_embed_dim=32, max_images=2, space_to_depth=2,
                                rngs=fast_rngs(0))
  assert layers.conv_in.kernel.shape == (3, 3, 12, 16) and len(layers.down_blocks) == 1
  mod_L = np.array([0] + [1] * n + [0] + [1] * n, np.int32)[None]
  patches = np.random.default_rng(1).normal(size=(1, 2 * n + 2, p_dim)).astype(np.float32)
  t = np.full(mod_L.shape, 300.0, np.float32)
  out = layers.decode(*layers.encode(patches, t, mod_L))
  patches[0, 1] += 1.0  # first image's first patch
  out2 = layers.decode(*layers.encode(patches, t, mod_L))
  assert out.shape == (1, 2 * n + 2, p_dim)
  np.testing.assert_allclose(out2[0, n + 2:], out[0, n + 2:], atol=1e-6)
  assert np.abs(out2[0, 1:1 + n] - out[0, 1:1 + n]).max() > 1e-4
  for fold in (3, 8):
    with pytest.raises(ValueError, match="unet_space_to_depth must be a power of two from 1 to"):
      modality.UNetPatches(patch_size=4, channels=3, grid_side=2, d_model=8, widths=(8,), blocks_per_level=1,
                           t_embed_dim=8, max_images=1, space_to_depth=fold, rngs=nnx.Rngs(0))


def test_scan_and_remat_match_the_plain_loop():
  """Same params: scan_layers + remat="dots" gives the plain loop's loss and gradients."""
  from tfx import losses
  loop = _model("linear")
  scanned = nnx.eval_shape(lambda: tfx.model.build_model(_config(scan_layers=True, remat="dots"), nnx.Rngs(0)))
  blocks = nnx.to_pure_dict(nnx.state(loop.blocks, nnx.Param))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(len(loop.blocks))])
  scanned_state = nnx.state(scanned.blocks, nnx.Param)
  nnx.replace_by_pure_dict(scanned_state, stacked)  # values only; keeps the 'layers' axis names
  nnx.update(scanned.blocks, scanned_state)
  for name in ("embed", "patches", "final_norm", "lm_head"):
    nnx.update(getattr(scanned, name), nnx.state(getattr(loop, name)))
  assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(scanned)))
  batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(5), 2, L, 16, 12, 200, 2).items()}
  config = _config()

  def loss_and_grad(model):
    graphdef, params = nnx.split(model)
    def loss(params):
      return losses.transfusion_loss(nnx.merge(graphdef, params), batch, jax.random.PRNGKey(0), config)[0]
    return jax.jit(jax.value_and_grad(loss))(params)

  (l1, g1), (l2, g2) = loss_and_grad(loop), loss_and_grad(scanned)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  gb = nnx.to_pure_dict(g1["blocks"])
  g1_stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[gb[i] for i in range(len(loop.blocks))])
  for a, b in zip(jax.tree.leaves(g1_stacked), jax.tree.leaves(nnx.to_pure_dict(g2["blocks"]))):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_flops_report_under_a_mesh_and_where_only_compiled_code_is_analysed(monkeypatch):
  """The trainer asks for FLOPs inside jax.set_mesh on GPUs/TPUs, and the GPU backend gives
  no cost analysis before compiling: both must give the CPU's plain answer."""
  from tfx import mesh as mesh_lib
  c = _config(encoder="unet")
  want = flops.report(c)
  with jax.set_mesh(mesh_lib.make_mesh(c.mesh, jax.devices()[:2])):
    assert flops.report(c) == pytest.approx(want, rel=1e-6)
  monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
  assert flops.report(c) == pytest.approx(want, rel=0.02)  # XLA counts the optimized HLO


@pytest.mark.parametrize("name", sorted(presets.PAPER_SIZES))
def test_paper_preset_param_counts_within_5_percent(name):
  c = presets.apply(tfx.config.default(), name)
  c.model.vocab_size = 32000  # Llama 2's, as in the paper's counts
  model = flops.abstract_model(presets.resolve(c))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  count = sum(int(np.prod(x.shape)) for x in leaves)
  assert abs(count / presets.PAPER_SIZES[name] - 1) < 0.05, count


def test_flops_report():
  c = _config()
  r = flops.report(c)
  m = presets.resolve(c).model
  assert r["params"] == r["params_embedding"] + r["params_blocks"] + r["params_modality"] + r["params_lm_head"] + 64
  per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64  # q,o + k,v (2 kv heads) + swiglu + norms
  assert r["params_blocks"] == m.n_layers * per_layer
  assert r["flops_per_token"] == 6 * (r["params_blocks"] + r["params_lm_head"]) + 6 * 2 * c.seq_len * 4 * 16
  # linear encoder: in/out projections and the timestep MLP, about 2 FLOPs per weight, x3 for training
  linear_weights = 12 * 64 * 2 + 32 * 64 + 64 * 64
  assert 0.9 < r["modality_flops_per_image_token"] / (6 * linear_weights) < 1.3
  # U-Net: its first 3x3 conv alone (3 -> 16 channels on the 8x8 grid, n=16) costs 2*9*3*16*64/16 per token
  unet = flops.report(_config(encoder="unet"))
  assert unet["modality_flops_per_image_token"] > 3 * 2 * 9 * 3 * 16 * 64 / 16
  assert unet["params_modality"] > r["params_modality"] and unet["flops_per_token"] == r["flops_per_token"]
  bad = tfx.config.default()
  bad.model.preset = "9B"
  with pytest.raises(ValueError, match="unknown model.preset"):
    presets.resolve(bad)
  for key, value, message in [("n_heads", 3, "not divisible"), ("head_dim", 15, "even head_dim"),
                              ("encoder", "vit", "model.encoder"), ("dtype", "fp8", "model.dtype"),
                              ("remat", "some", "model.remat")]:
    with pytest.raises(ValueError, match=message):  # preset "" so the sizes set here are used
      nnx.eval_shape(lambda: tfx.model.build_model(_config(preset="", **{key: value}), nnx.Rngs(0)))


def test_bfloat16_compute_keeps_fp32_params_and_outputs():
  """model.dtype="bfloat16": same fp32 params, bf16 matmuls, fp32 logits close to the fp32 model's."""
  graphdef_bf16, _ = nnx.split(nnx.eval_shape(lambda: tfx.model.build_model(_config(dtype="bfloat16"),
                                                                              nnx.Rngs(0))))
  params = nnx.state(_model("linear"))
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  batch = _batch()
  t = np.where(batch["modality"] == 1, 300.0, 0.0).astype(np.float32)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  logits_bf16, out_bf16 = jax.jit(lambda p, b, t: nnx.merge(graphdef_bf16, p)(b, t)[:2])(params, jb, t)
  logits, out = _run("linear", batch, t)
  assert logits_bf16.dtype == jnp.float32 and out_bf16.dtype == jnp.float32
  live = batch["segment_ids"] > 0
  scale = np.abs(logits[live]).mean()
  assert np.abs(np.asarray(logits_bf16)[live] - logits[live]).mean() < 0.05 * scale
  assert np.abs(np.asarray(logits_bf16) - logits).max() > 0  # bf16 really was used


def test_unet_image_slots_equal_each_image_alone():
  """Packed rows with 0..max_images_per_seq images: every image's U-Net output (encode, and decode
  of it) equals that image run alone; an image past the bound turns NaN instead of borrowing a slot."""
  layers = _model("unet").patches
  graphdef, state = nnx.split(layers)
  M, n = _config().image.max_images_per_seq, 16

  @jax.jit
  def run(state, patches, t, modality_BL):
    mod = nnx.merge(graphdef, state)
    x, ctx = mod.encode(patches, t, modality_BL)
    return x, mod.decode(x, ctx)

  rng = np.random.default_rng(7)
  b = random_batch(rng, 7, 96, n, 12, vocab=200, max_images=M)
  text_row = random_batch(rng, 1, 96, n, 12, vocab=200, max_images=0)
  b = {k: np.concatenate([b[k], text_row[k]]) for k in b}
  counts = b["image_ids"].max(axis=1)
  assert counts.max() == M and counts.min() == 0 and len(set(counts)) >= 3, counts
  t_BL = rng.uniform(0, 1000, size=b["modality"].shape).astype(np.float32)
  starts = [(r, i) for r in range(8) for i in range(96)
            if b["modality"][r, i] == 1 and (i == 0 or b["modality"][r, i - 1] == 0)]
  t_BL[b["modality"] == 1] = np.concatenate([[t_BL[r, i]] * n for r, i in starts])  # one t per image
  x, out = run(state, b["patches"], t_BL, b["modality"])
  alone_patches = np.stack([b["patches"][r, i:i + n] for r, i in starts])
  alone_t = np.stack([t_BL[r, i:i + n] for r, i in starts])
  x_ref, out_ref = run(state, alone_patches, alone_t, np.ones(alone_t.shape, np.int32))
  for j, (r, i) in enumerate(starts):
    np.testing.assert_allclose(x[r, i:i + n], x_ref[j], atol=1e-5)
    np.testing.assert_allclose(out[r, i:i + n], out_ref[j], atol=1e-5)

  over = random_batch(np.random.default_rng(8), 4, 128, n, 12, vocab=200, max_images=M + 1)
  assert over["image_ids"].max() == M + 1
  x_over, _ = run(state, over["patches"], np.zeros((4, 128), np.float32), over["modality"])
  past = over["image_ids"] > M
  assert np.isnan(np.asarray(x_over)[past]).all() and not np.isnan(np.asarray(x_over)[~past]).any()
