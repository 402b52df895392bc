"""`python -m tfx.train_autoencoder --config=experiments/X.py --workdir=W`: trains the tfx KL-VAE on shapes.

Images are rendered from the shapes scene grammar (all colour-shape pairs) at
config.image.resolution, a fresh deterministic batch per step, so a resumed run
sees the same data. At the end the latent shift/scale are measured, the test
images are scored, and WORKDIR/autoencoder.json tells `autoencoder.load` (kind
"vae", path W) how to use the checkpoint.
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tfx import checkpoint
from tfx import mesh as mesh_lib
from tfx import metrics as metrics_lib
from tfx.autoencoder import AutoencoderError, quality, vae
from tfx.autoencoder.base import NetAutoencoder
from tfx.data import shapes

CALIBRATION_STREAM = 1  # rng streams: 0 = training batches, 1 = latent statistics, 2 = test images
TEST_STREAM = 2
CALIBRATION_IMAGES = 1024


def shapes_images(seed: int, stream: int, index: int, n: int, resolution: int):
  """n rendered scenes (uint8 [n,H,W,3]) and captions, determined by (seed, stream, index)."""
  rng = np.random.default_rng([seed, stream, index])
  specs = [shapes.sample_spec(rng, shapes.COMBOS) for _ in range(n)]
  return np.stack([shapes.render(s, resolution) for s in specs]), [shapes.caption(s) for s in specs]


def make_optimizer(ae_config) -> optax.GradientTransformation:
  steps = ae_config.train_steps
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, ae_config.train_lr, warmup_steps=max(1, min(100, steps // 10)), decay_steps=max(steps, 2),
      end_value=0.05 * ae_config.train_lr)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def make_train_step(graphdef, optimizer, kl_weight: float):
  """A jitted pure (params, opt_state, images, rng) -> (params, opt_state, metrics)."""

  def train_step(params, opt_state, images_BHWC, rng):
    def loss(p):
      return vae.loss_fn(nnx.merge(graphdef, p), images_BHWC, rng, kl_weight)

    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    metrics["grad_norm"] = optax.global_norm(grads)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.jit(train_step, donate_argnums=(0, 1))


def _fit_sharding(sharding: NamedSharding, shape) -> NamedSharding:
  """Drops mesh axes that do not divide a dim (e.g. 3 RGB output channels over tensor=2)."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for i, axes in enumerate(spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if shape[i] % int(np.prod([sharding.mesh.shape[a] for a in names])):
      spec[i] = None
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def init_params(config, mesh):
  """(graphdef, params as a sharded pure dict) of a freshly initialised VAE."""
  graphdef, state = nnx.split(vae.build(config, nnx.Rngs(config.seed)))
  shardings = nnx.to_pure_dict(mesh_lib.state_shardings(state, mesh))
  params = nnx.to_pure_dict(state)
  shardings = jax.tree.map(lambda s, p: _fit_sharding(s, p.shape), shardings, params)
  return graphdef, jax.device_put(params, shardings)


def _global_batch(local_BHWC: np.ndarray, mesh) -> jax.Array:
  sharding = mesh_lib.batch_sharding(mesh, local_BHWC.ndim)
  return jax.make_array_from_process_local_data(sharding, quality.to_unit(local_BHWC))


def latent_statistics(ae: NetAutoencoder, images_uint8: np.ndarray) -> tuple[float, float]:
  """(shift, scale) so that (latent - shift) * scale has mean 0 and std 1 over the images."""
  latents = np.concatenate([np.asarray(ae.encode(quality.to_unit(images_uint8[i:i + 128])))
                            for i in range(0, len(images_uint8), 128)])
  return float(latents.mean()), float(1.0 / max(latents.std(), 1e-6))


def _local_params(params) -> dict:
  """Params gathered onto one local device (for the single-device encode/decode wrapper)."""
  device = jax.local_devices()[0]
  return jax.tree.map(lambda a: jax.device_put(jnp.asarray(a), device), params)


def run(config, workdir, *, log=print) -> dict:
  """Trains (or resumes) the VAE in `workdir`; returns the final test metrics."""
  c = config.autoencoder
  cfg = vae.net_config(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if c.train_batch_size % shards or c.train_batch_size % jax.process_count():
    raise AutoencoderError(f"autoencoder.train_batch_size={c.train_batch_size} does not split over "
                           f"{shards} data shards and {jax.process_count()} hosts")
  local_batch = c.train_batch_size // jax.process_count()
  with jax.set_mesh(mesh):
    graphdef, params = init_params(config, mesh)
    optimizer = make_optimizer(c)
    opt_state = jax.jit(optimizer.init)(params)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    start = ckpt.latest_step() or 0
    if start:
      restored = ckpt.restore(start, {"params": params, "opt_state": opt_state})
      params, opt_state = restored["params"], restored["opt_state"]
      writer.drop_after(start)
      log(f"resumed from step {start}")
    train_step = make_train_step(graphdef, optimizer, c.kl_weight)
    rng = jax.random.key(config.seed)
    t0, t_last = time.time(), time.time()
    for step in range(start, c.train_steps):
      images, _ = shapes_images(config.seed, 0, step * jax.process_count() + jax.process_index(),
                                local_batch, config.image.resolution)
      params, opt_state, metrics = train_step(params, opt_state, _global_batch(images, mesh),
                                              jax.random.fold_in(rng, step))
      done = step + 1
      if done % config.log_every_steps == 0 or done == c.train_steps:
        metrics = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(metrics["loss"]):
          raise FloatingPointError(f"autoencoder loss is {metrics['loss']} at step {done}")
        now = time.time()
        metrics["steps_per_sec"] = config.log_every_steps / max(now - t_last, 1e-9)
        t_last = now
        writer.write(done, metrics)
        log(f"step {done}/{c.train_steps} loss {metrics['loss']:.4f} l2 {metrics['l2']:.5f} "
            f"kl {metrics['kl']:.3f} {metrics['steps_per_sec']:.2f} steps/s")
      if done % config.checkpoint_every_steps == 0 or done == c.train_steps:
        ckpt.save(done, {"params": params, "opt_state": opt_state})
    ckpt.wait()
    ckpt.close()
    writer.close()
  train_seconds = time.time() - t0
  ae = NetAutoencoder(nnx.merge(graphdef, _local_params(params)), 1.0, 0.0)
  calib, _ = shapes_images(config.seed, CALIBRATION_STREAM, 0, CALIBRATION_IMAGES, config.image.resolution)
  shift, scale = latent_statistics(ae, calib)
  test_images, captions = shapes_images(config.seed, TEST_STREAM, 0, c.eval_images, config.image.resolution)
  results = quality.evaluate(ae, test_images, captions)
  results |= dict(train_seconds=train_seconds, steps=c.train_steps, start_step=start)
  if jax.process_index() == 0:
    vae.save_metadata(workdir, cfg, scaling_factor=scale, shift_factor=shift,
                      image_resolution=config.image.resolution, test=results,
                      config=config.autoencoder.to_dict())
  log(f"test: PSNR {results['psnr_db']:.2f} dB, scorer pass rate {results['scorer_rate_reconstructed']:.3f} "
      f"(originals {results['scorer_rate_original']:.3f}, ratio {results['scorer_ratio']:.3f}); "
      f"set autoencoder.kind='vae' autoencoder.path='{workdir}' autoencoder.scaling_factor={scale:g} "
      f"autoencoder.shift_factor={shift:g}")
  return results


def main(argv):
  if len(argv) > 1:
    print(f"unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  config = flags.FLAGS.config
  if config is None or not flags.FLAGS.workdir:
    print("usage: python -m tfx.train_autoencoder --config=experiments/X.py --workdir=DIR", file=sys.stderr)
    sys.exit(2)
  try:
    vae.net_config(config)
  except AutoencoderError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  epath.Path(flags.FLAGS.workdir).mkdir(parents=True, exist_ok=True)
  run(config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "experiment config file (get_config)")
  flags.DEFINE_string("workdir", None, "where checkpoints, metrics and autoencoder.json go")
  app.run(main)
