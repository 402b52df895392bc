"""The KL-VAE that tfx trains itself (`python -m tfx.train_autoencoder`): build, loss, load.

A trained workdir holds autoencoder.json (architecture + latent scaling) and the
Orbax checkpoints of tfx.checkpoint.Checkpointer; `load(workdir)` turns them
into an Autoencoder.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from tfx import fs
from tfx.autoencoder import nets
from tfx.autoencoder.base import AutoencoderError, NetAutoencoder

METADATA_FILE = "autoencoder.json"


def net_config(config) -> nets.NetConfig:
  """The VAE architecture from config.autoencoder (vae_* keys, latent_channels, downsample)."""
  c = config.autoencoder
  cfg = nets.NetConfig(block_out_channels=tuple(c.vae_channels), layers_per_block=c.vae_layers_per_block,
                       latent_channels=c.latent_channels, norm_num_groups=c.vae_norm_groups,
                       mid_block_add_attention=c.vae_mid_attention)
  if cfg.downsample != c.downsample:
    raise AutoencoderError(f"autoencoder.vae_channels has {len(cfg.block_out_channels)} levels, which "
                           f"downsample by {cfg.downsample}, but autoencoder.downsample={c.downsample}")
  bad = [ch for ch in cfg.block_out_channels if ch % cfg.norm_num_groups]
  if bad:
    raise AutoencoderError(f"autoencoder.vae_channels {bad} not divisible by vae_norm_groups={cfg.norm_num_groups}")
  return cfg


def build(config, rngs: nnx.Rngs) -> nets.AutoencoderKL:
  return nets.AutoencoderKL(net_config(config), rngs)


def loss_fn(net: nets.AutoencoderKL, images_BHWC, rng, kl_weight: float):
  """L1 + L2 reconstruction of a posterior sample, plus kl_weight * KL per pixel (SD's scaling)."""
  mean, logvar = net.moments(images_BHWC)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
  err = net.decode(z) - images_BHWC
  l1, l2 = jnp.abs(err).mean(), jnp.square(err).mean()
  kl_per_image = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  kl = kl_per_image.mean() / (images_BHWC[0].size)
  loss = l1 + l2 + kl_weight * kl
  return loss, dict(loss=loss, l1=l1, l2=l2, kl=kl, latent_std=jnp.exp(0.5 * logvar).mean())


def save_metadata(workdir, cfg: nets.NetConfig, *, scaling_factor: float, shift_factor: float,
                  **extra) -> dict:
  """Writes WORKDIR/autoencoder.json: what `load` needs besides the params."""
  meta = dict(net=dataclasses.asdict(cfg), scaling_factor=float(scaling_factor),
              shift_factor=float(shift_factor), **extra)
  fs.write_text(fs.join(workdir, METADATA_FILE), json.dumps(meta, indent=2, sort_keys=True) + "\n")
  return meta


def read_metadata(workdir) -> dict:
  path = fs.join(workdir, METADATA_FILE)
  if not fs.exists(path):
    raise AutoencoderError(f"{workdir}: no {METADATA_FILE}; train one with "
                           "`python -m tfx.train_autoencoder --config=... --workdir=...`")
  return json.loads(fs.read_text(path))


def net_config_from_meta(meta: dict) -> nets.NetConfig:
  raw = dict(meta["net"])
  raw["block_out_channels"] = tuple(raw["block_out_channels"])
  return nets.NetConfig(**raw)


def restore_params(workdir, state: nnx.State, step: int | None = None) -> nnx.State:
  """`state` (abstract) filled with the params of a `tfx.train_autoencoder` checkpoint (latest unless `step`)."""
  from tfx import checkpoint  # Orbax lives there

  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
      raise AutoencoderError(f"{workdir}: no autoencoder checkpoint{'' if step is None else f' at step {step}'}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          nnx.to_pure_dict(state))
    params = ckpt.restore_subtree(step, {"params": target})["params"]
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(state, params)
  return state


def load(workdir, step: int | None = None) -> NetAutoencoder:
  """The trained VAE of a `tfx.train_autoencoder` workdir (latest checkpoint unless `step`)."""
  meta = read_metadata(workdir)
  if meta.get("kind") == "vq":
    raise AutoencoderError(f"{workdir} holds a VQ tokenizer, not a KL-VAE; use autoencoder.kind='vq'")
  graphdef, state = nets.abstract_autoencoder(net_config_from_meta(meta))
  state = restore_params(workdir, state, step)
  return NetAutoencoder(nnx.merge(graphdef, state), scaling_factor=meta["scaling_factor"],
                        shift_factor=meta["shift_factor"])
