"""`python -m tfx.train_autoencoder --config=experiments/X.py --workdir=W`: trains the tfx KL-VAE
(or, with autoencoder.kind="vq", the VQ tokenizer of tfx/autoencoder/vq.py).

It reads the image-caption dataset config.data.image_text (default: the built-in
shapes) exactly as the Grain pipeline does (center crop, resize to
config.image.resolution): random train images per step from (seed, step), so a
resumed run sees the same data. At the end it measures the latent shift/scale on
train images (VAE; a VQ reports its codes' usage and perplexity instead), scores
reconstructions of the test split (PSNR; the shapes scorer when the data is shapes)
and writes WORKDIR/autoencoder.json, which `tfx.autoencoder.load` (kind "vae" or
"vq", path W) needs besides the checkpoint.
"""
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from tfx import checkpoint, fs, loop
from tfx import mesh as mesh_lib
from tfx import metrics as metrics_lib
from tfx.autoencoder import AutoencoderError, cli, quality, vae, vq
from tfx.autoencoder.base import NetAutoencoder

PROG = "tfx.train_autoencoder"
CALIBRATION_IMAGES = 1024


def open_images(config, split: str):
  """Random-access source of config.data.image_text's `split`; it must hold pixels."""
  from tfx.data import builders, builtin  # tfds only when training

  path = builtin.resolve(config, config.data.image_text)
  if "image" not in builders.feature_names(path):
    raise AutoencoderError(f"{path} holds no `image` feature (a latent cache?); train on a pixel dataset")
  return builders.open_split(path, split)


def read_images(source, indices, resolution: int):
  """uint8 [n,R,R,3] images as the Grain pipeline sees them, and their captions."""
  from tfx.data.pipeline import pixels_to_model

  examples = [source[int(i)] for i in indices]
  images = np.stack([quality.to_uint8(pixels_to_model(ex["image"], resolution)) for ex in examples])
  captions = [ex["caption"].decode() if isinstance(ex["caption"], bytes) else str(ex["caption"])
              for ex in examples]
  return images, captions


def make_optimizer(train_steps: int, lr: float) -> optax.GradientTransformation:
  """Clipped Adam, linear warmup then cosine decay to 5% of `lr`."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=max(1, min(100, train_steps // 10)), decay_steps=max(train_steps, 2),
      end_value=0.05 * lr)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def loss_spec(config):
  """The hashable loss choice of config.autoencoder: the VAE's KL weight or the VQ's VQConfig."""
  return vq.vq_config(config) if config.autoencoder.kind == "vq" else config.autoencoder.kl_weight


@functools.lru_cache(maxsize=8)
def make_train_step(graphdef, train_steps: int, lr: float, loss, skip_non_finite: bool = False):
  """(optimizer, jitted pure (params, opt_state, images, rng) -> (params, opt_state, metrics)).

  `loss` is `loss_spec(config)`: a float (the KL-VAE's kl_weight) or a vq.VQConfig, whose
  codebook statistics the step overwrites after the optimizer's update.
  metrics["finite"] flags a finite loss, gradient and update (as tfx/step.py's); with
  `skip_non_finite` a step that is not keeps the old params and optimizer state."""
  optimizer = make_optimizer(train_steps, lr)
  is_vq = isinstance(loss, vq.VQConfig)

  def train_step(params, opt_state, images_BHWC, rng):
    def loss_fn(p):
      if is_vq:
        return vq.loss_fn(nnx.merge(graphdef, p), images_BHWC, rng, loss)
      value, metrics = vae.loss_fn(nnx.merge(graphdef, p), images_BHWC, rng, loss)
      return value, (metrics, {})

    (_, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if stats:
      new_params = {**new_params, **stats}
    metrics["grad_norm"] = optax.tree.norm(grads)
    finite = loop.all_finite((metrics["loss"], metrics["grad_norm"], new_params, new_opt_state))
    metrics["finite"] = finite.astype(jnp.float32)
    if skip_non_finite:
      new_params, new_opt_state = loop.keep_if_finite(finite, (new_params, new_opt_state), (params, opt_state))
    return new_params, new_opt_state, metrics

  return optimizer, jax.jit(train_step, donate_argnums=(0, 1))


def _fit_sharding(sharding: NamedSharding, shape) -> NamedSharding:
  """Drops mesh axes that do not divide a dim (e.g. 3 RGB output channels over tensor=2)."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for i, axes in enumerate(spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if shape[i] % int(np.prod([sharding.mesh.shape[a] for a in names])):
      spec[i] = None
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def init_params(config, mesh):
  """(graphdef, params as a sharded pure dict) of a freshly initialised VAE, built in one jitted call."""
  # The rbg generator compiles several times faster than threefry for a conv net's many
  # initialisers (minutes on a loaded CPU); its values may differ across mesh shapes.
  family = vq if config.autoencoder.kind == "vq" else vae
  build = lambda: nnx.split(family.build(config, nnx.Rngs(jax.random.key(config.seed, impl="rbg"))))
  graphdef, abstract = nnx.eval_shape(build)
  shardings = nnx.to_pure_dict(mesh_lib.state_shardings(abstract, mesh))
  shardings = jax.tree.map(lambda s, p: _fit_sharding(s, p.shape), shardings, nnx.to_pure_dict(abstract))
  params = jax.jit(lambda: nnx.to_pure_dict(build()[1]), out_shardings=shardings)()
  return graphdef, params


def _global_batch(local_BHWC: np.ndarray, mesh) -> jax.Array:
  sharding = mesh_lib.batch_sharding(mesh, local_BHWC.ndim)
  return jax.make_array_from_process_local_data(sharding, quality.to_unit(local_BHWC))


def latent_statistics(ae: NetAutoencoder, images_uint8: np.ndarray) -> tuple[float, float]:
  """(shift, scale) so that (latent - shift) * scale has mean 0 and std 1 over the images."""
  latents = quality.batched(ae.encode, quality.to_unit(images_uint8))
  return float(latents.mean()), float(1.0 / max(latents.std(), 1e-6))


def _host_params(params) -> dict:
  """The full params as numpy on every host (for the single-device encode/decode wrapper)."""
  return multihost_utils.process_allgather(params, tiled=True)


def run(config, workdir, *, log=print) -> dict:
  """Trains (or resumes) the VAE in `workdir`; returns the final test metrics, or
  {"preempted": True, "step": ...} after SIGTERM saved a checkpoint (as tfx/trainer.py does)."""
  c = config.autoencoder
  cfg = vae.net_config(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if c.train_batch_size % shards or c.train_batch_size % jax.process_count():
    raise AutoencoderError(f"autoencoder.train_batch_size={c.train_batch_size} does not split over "
                           f"{shards} data shards and {jax.process_count()} hosts")
  local_batch = c.train_batch_size // jax.process_count()
  train, test = open_images(config, "train"), open_images(config, "test")
  graphdef, params = init_params(config, mesh)  # outside set_mesh: logical names are not mesh axes
  try:
    guard = loop.FiniteGuard(config.optim.nan_policy, config.optim.max_skips_in_row)
  except ValueError as e:
    raise AutoencoderError(str(e)) from None
  with jax.set_mesh(mesh):
    optimizer, train_step = make_train_step(graphdef, c.train_steps, c.train_lr, loss_spec(config),
                                            guard.policy == "skip")
    opt_state = jax.jit(optimizer.init)(params)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    start = ckpt.latest_step() or 0
    if start:
      restored = ckpt.restore(start, {"params": params, "opt_state": opt_state})
      params, opt_state = restored["params"], restored["opt_state"]
      writer.drop_after(start)
      log(f"resumed from step {start}")
    rng = jax.random.key(config.seed)
    t0, t_last = time.time(), [time.time()]
    delayed = metrics_lib.DelayedFetch()  # the host logs step s-1 while the device runs step s

    def handle(fetched):
      step, metrics = fetched
      guard.check(step, metrics)  # raises before a state from (or after) a non-finite step is saved
      if step % max(config.log_every_steps, 1) == 0 or step == c.train_steps:
        metrics = {k: v for k, v in metrics.items() if k != "finite"}
        now = time.time()
        metrics["steps_per_sec"] = config.log_every_steps / max(now - t_last[0], 1e-9)
        t_last[0] = now
        if guard.policy == "skip":
          metrics["skipped_steps"] = float(guard.take_skipped())
        writer.write(step, metrics)
        third = (f"perplexity {metrics['perplexity']:.1f}" if "perplexity" in metrics
                 else f"kl {metrics['kl']:.3f}")
        log(f"step {step}/{c.train_steps} loss {metrics['loss']:.4f} l2 {metrics['l2']:.5f} "
            f"{third} {metrics['steps_per_sec']:.2f} steps/s")

    try:
      with loop.sigterm_flag() as sigterm:
        for step in range(start, c.train_steps):
          rng_np = np.random.default_rng([config.seed, step, jax.process_index()])
          images, _ = read_images(train, rng_np.integers(len(train), size=local_batch), config.image.resolution)
          params, opt_state, metrics = train_step(params, opt_state, _global_batch(images, mesh),
                                                  jax.random.fold_in(rng, step))
          done = step + 1
          if (fetched := delayed.push(done, metrics)):
            handle(fetched)
          stopping = loop.preempted(ckpt, sigterm, done)
          every = config.checkpoint_every_steps
          if stopping or (every and done % every == 0) or done == c.train_steps:
            if (fetched := delayed.flush()):
              handle(fetched)
            ckpt.save(done, {"params": params, "opt_state": opt_state})
          if stopping:
            log(f"preempted (SIGTERM): saved the checkpoint at step {done}; stopping")
            return {"preempted": True, "step": done, "start_step": start}
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()
  train_seconds = time.time() - t0
  if c.kind == "vq":
    return _finish_vq(config, workdir, cfg, nnx.merge(graphdef, _host_params(params)), test, start,
                      train_seconds, log)
  ae = NetAutoencoder(nnx.merge(graphdef, _host_params(params)), 1.0, 0.0)
  calib, _ = read_images(train, range(min(CALIBRATION_IMAGES, len(train))), config.image.resolution)
  shift, scale = latent_statistics(ae, calib)
  test_images, captions = read_images(test, range(min(c.eval_images, len(test))), config.image.resolution)
  results = quality.evaluate(ae, test_images, captions, score=config.data.image_text == "shapes")
  results |= dict(train_seconds=train_seconds, steps=c.train_steps, start_step=start)
  if jax.process_index() == 0:
    vae.save_metadata(workdir, cfg, scaling_factor=scale, shift_factor=shift,
                      image_resolution=config.image.resolution, test=results,
                      config=config.autoencoder.to_dict())
  log(f"test ({results['images']} images): PSNR {results['psnr_db']:.2f} dB{_scored(results)}; "
      f"set autoencoder.kind='vae' autoencoder.path='{workdir}' autoencoder.scaling_factor={scale!r} "
      f"autoencoder.shift_factor={shift!r}")
  return results


def _scored(results: dict) -> str:
  return (f", scorer pass rate {results['scorer_rate_reconstructed']:.3f} (originals "
          f"{results['scorer_rate_original']:.3f}, ratio {results['scorer_ratio']:.3f})"
          if "scorer_ratio" in results else "")


def _finish_vq(config, workdir, cfg, net: vq.VQNet, test, start: int, train_seconds: float, log) -> dict:
  """Test-split reconstruction quality and code usage of a trained VQ tokenizer; writes autoencoder.json."""
  c = config.autoencoder
  ae = vq.VQAutoencoder(net)
  test_images, captions = read_images(test, range(min(c.eval_images, len(test))), config.image.resolution)
  results = quality.evaluate(ae, test_images, captions, score=config.data.image_text == "shapes")
  codes = quality.batched(ae.encode, quality.to_unit(test_images))
  usage = vq.usage_stats(jnp.bincount(jnp.asarray(codes).reshape(-1), length=ae.codebook_size).astype(jnp.float32))
  results |= {k: float(v) for k, v in usage.items()}
  results |= dict(train_seconds=train_seconds, steps=c.train_steps, start_step=start)
  if jax.process_index() == 0:
    vq.save_metadata(workdir, cfg, net.vq, image_resolution=config.image.resolution, test=results,
                     config=config.autoencoder.to_dict())
  log(f"test ({results['images']} images): PSNR {results['psnr_db']:.2f} dB{_scored(results)}; code perplexity "
      f"{results['perplexity']:.1f}, {results['codes_used']:.0%} of {ae.codebook_size} codes used; set "
      f"autoencoder.kind='vq' autoencoder.path='{workdir}' autoencoder.codebook_size={ae.codebook_size}")
  return results


def main(argv) -> None:
  config = cli.checked_config(PROG, argv, _CONFIG)
  if not _WORKDIR.value:
    cli.usage_error(PROG, "--workdir is required")
  try:
    vae.net_config(config)
    if config.autoencoder.kind == "vq":
      vq.vq_config(config)
    fs.makedirs(_WORKDIR.value)
    run(config, _WORKDIR.value)
  except (AutoencoderError, mesh_lib.MeshError, FileNotFoundError) as e:
    cli.usage_error(PROG, str(e))
  except metrics_lib.NonFiniteLossError as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _CONFIG = cli.define_config_flag()
  _WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and autoencoder.json go")
  app.run(main, flags_parser=cli.flags_parser(PROG))
