"""The VQ-VAE image tokenizer behind the Chameleon baseline: images <-> int codes [B, h, w].

The encoder and decoder are tfx/autoencoder/nets.py's (as the KL-VAE's); between
them each latent vector is replaced by its nearest entry of a codebook of
autoencoder.codebook_size vectors. Training (`python -m tfx.train_autoencoder` with
autoencoder.kind="vq") minimises L1 + L2 reconstruction + beta * commitment; the
codebook follows the encoder outputs by EMA (autoencoder.vq_ema_decay > 0) or learns by
gradient through the codebook loss (decay 0, straight-through). Codes whose EMA usage
falls under autoencoder.vq_dead_threshold are restarted at random encoder outputs of
the batch. A trained workdir holds autoencoder.json (kind "vq") and the Orbax
checkpoints; `load(workdir)` returns a VQAutoencoder.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfx.autoencoder import nets, vae
from tfx.autoencoder.base import Autoencoder, AutoencoderError


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """The quantizer's fields of autoencoder.json."""
  codebook_size: int = 256
  beta: float = 0.25
  ema_decay: float = 0.99
  dead_threshold: float = 1.0


def vq_config(config) -> VQConfig:
  c = config.autoencoder
  if c.codebook_size < 2:
    raise AutoencoderError(f"autoencoder.codebook_size must be >= 2, got {c.codebook_size}")
  if not 0.0 <= c.vq_ema_decay < 1.0:
    raise AutoencoderError(f"autoencoder.vq_ema_decay must be in [0, 1), got {c.vq_ema_decay}")
  return VQConfig(codebook_size=int(c.codebook_size), beta=float(c.vq_beta), ema_decay=float(c.vq_ema_decay),
                  dead_threshold=float(c.vq_dead_threshold))


def net_config(config) -> nets.NetConfig:
  return vae.net_config(config)


def _state(value, names):
  return nnx.Param(value, out_sharding=names)


class VQNet(nnx.Module):
  """Encoder -> 1x1 conv -> nearest codebook entry -> 1x1 conv -> Decoder.

  `usage` (EMA of how often each code is picked per batch) and, with EMA updates,
  `ema_sum` are training statistics: the train step overwrites them (and the codebook)
  from `loss_fn`'s updates, not from gradients.
  """

  def __init__(self, cfg: nets.NetConfig, vq: VQConfig, rngs: nnx.Rngs):
    self.cfg, self.vq = cfg, vq
    lc, k = cfg.latent_channels, vq.codebook_size
    self.encoder = nets.Encoder(cfg, rngs)   # 2 * latent_channels outputs, as the VAE's moments
    self.quant_conv = nets._conv(2 * lc, lc, 1, rngs)
    self.post_quant_conv = nets._conv(lc, lc, 1, rngs)
    self.decoder = nets.Decoder(cfg, rngs)
    codebook = jax.random.normal(rngs.params(), (k, lc), jnp.float32)
    self.codebook = _state(codebook, (None, None))
    self.usage = _state(jnp.ones((k,), jnp.float32), (None,))
    self.ema_sum = _state(codebook, (None, None))

  def vectors(self, images_BHWC):
    """Continuous encoder outputs [B, h, w, latent_channels] (before quantization)."""
    return self.quant_conv(self.encoder(images_BHWC))

  def decode_vectors(self, q_BhwD):
    return self.decoder(self.post_quant_conv(q_BhwD))

  def encode(self, images_BHWC):
    return nearest(self.vectors(images_BHWC), self.codebook[...])

  def decode(self, codes_Bhw):
    return self.decode_vectors(jnp.take(self.codebook[...], codes_Bhw, axis=0))


def nearest(z_BhwD, codebook_KD):
  """Index of the nearest codebook entry (squared L2) of every vector: int32 [B, h, w]."""
  d_BhwK = (jnp.sum(jnp.square(z_BhwD), -1, keepdims=True) - 2.0 * z_BhwD @ codebook_KD.T
            + jnp.sum(jnp.square(codebook_KD), -1))
  return jnp.argmin(d_BhwK, axis=-1).astype(jnp.int32)


def usage_stats(counts_K) -> dict:
  """Perplexity (exp entropy) of the code distribution and the share of codes used at all."""
  p = counts_K / jnp.maximum(counts_K.sum(), 1.0)
  perplexity = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))
  return dict(perplexity=perplexity, codes_used=jnp.mean((counts_K > 0).astype(jnp.float32)))


def loss_fn(net: VQNet, images_BHWC, rng, vq: VQConfig):
  """(loss, (metrics, updates)): L1 + L2 of the reconstruction + beta * commitment (+ the codebook
  loss when not EMA); `updates` are the new codebook/usage/ema_sum (EMA step, dead-code restarts)."""
  z_BhwD = net.vectors(images_BHWC)
  codebook_KD = net.codebook[...]
  ema = vq.ema_decay > 0
  e_KD = jax.lax.stop_gradient(codebook_KD) if ema else codebook_KD
  codes_Bhw = nearest(jax.lax.stop_gradient(z_BhwD), jax.lax.stop_gradient(codebook_KD))
  q_BhwD = jnp.take(e_KD, codes_Bhw, axis=0)
  err = net.decode_vectors(z_BhwD + jax.lax.stop_gradient(q_BhwD - z_BhwD)) - images_BHWC
  l1, l2 = jnp.abs(err).mean(), jnp.square(err).mean()
  commit = jnp.square(z_BhwD - jax.lax.stop_gradient(q_BhwD)).mean()
  codebook_loss = 0.0 if ema else jnp.square(jax.lax.stop_gradient(z_BhwD) - q_BhwD).mean()
  loss = l1 + l2 + vq.beta * commit + codebook_loss

  z_ND = jax.lax.stop_gradient(z_BhwD).reshape(-1, z_BhwD.shape[-1])
  updates, counts_K, dead_K = codebook_update(codebook_KD, net.usage[...], net.ema_sum[...], z_ND,
                                              codes_Bhw.reshape(-1), rng, vq)
  metrics = dict(loss=loss, l1=l1, l2=l2, commit=commit, restarted=dead_K.sum().astype(jnp.float32),
                 **usage_stats(counts_K))
  return loss, (metrics, updates)


def codebook_update(codebook_KD, usage_K, ema_sum_KD, z_ND, codes_N, rng, vq: VQConfig):
  """(updates, counts_K, dead_K): one step's new codebook/usage/ema_sum from the batch's encoder outputs
  z_ND and their codes (EMA step when vq.ema_decay > 0), with dead codes restarted at outputs of the batch."""
  K = vq.codebook_size
  ema = vq.ema_decay > 0
  onehot_NK = jax.nn.one_hot(codes_N, K, dtype=jnp.float32)
  counts_K = onehot_NK.sum(0)
  decay = vq.ema_decay if ema else 0.99   # straight-through still tracks usage for the restarts
  usage_K = decay * usage_K + (1 - decay) * counts_K
  if ema:
    ema_sum_KD = vq.ema_decay * ema_sum_KD + (1 - vq.ema_decay) * onehot_NK.T @ z_ND
    new_codebook_KD = ema_sum_KD / jnp.maximum(usage_K, 1e-5)[:, None]
  else:
    new_codebook_KD = codebook_KD
  # dead codes restart at random encoder outputs of this batch, as if used evenly since
  dead_K = usage_K < vq.dead_threshold
  picks_KD = z_ND[jax.random.randint(rng, (K,), 0, z_ND.shape[0])]
  fresh = z_ND.shape[0] / K
  new_codebook_KD = jnp.where(dead_K[:, None], picks_KD, jax.lax.stop_gradient(new_codebook_KD))
  usage_K = jnp.where(dead_K, fresh, usage_K)
  ema_sum_KD = jnp.where(dead_K[:, None], picks_KD * fresh, ema_sum_KD)
  return dict(codebook=new_codebook_KD, usage=usage_K, ema_sum=ema_sum_KD), counts_K, dead_K


def build(config, rngs: nnx.Rngs) -> VQNet:
  return VQNet(net_config(config), vq_config(config), rngs)


def abstract_net(cfg: nets.NetConfig, vq: VQConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of a VQNet; allocates nothing (see nets.abstract_autoencoder)."""
  graphdefs = []

  def build_state():
    with nnx.use_eager_sharding(False):
      graphdef, state = nnx.split(VQNet(cfg, vq, nnx.Rngs(0)))
    graphdefs.append(graphdef)
    return state

  state = jax.eval_shape(build_state)
  return graphdefs[0], state


@functools.lru_cache(maxsize=16)
def _jitted(graphdef):
  """Jitted (encode, decode) of one architecture, shared by every instance (compiled once)."""
  encode = jax.jit(lambda params, x: nnx.merge(graphdef, params).encode(x))
  decode = jax.jit(lambda params, codes: nnx.merge(graphdef, params).decode(codes))
  return encode, decode


class VQAutoencoder(Autoencoder):
  """images [B,H,W,3] in [-1,1] <-> int32 codes [B,H/f,W/f] in [0, codebook_size)."""

  def __init__(self, net: VQNet):
    self.net_config, self.vq = net.cfg, net.vq
    self.downsample = net.cfg.downsample
    self.latent_channels = net.cfg.latent_channels
    self.codebook_size = net.vq.codebook_size
    self.graphdef, self.params = nnx.split(net)
    self._encode, self._decode = _jitted(self.graphdef)

  def encode(self, images_BHWC):
    """images -> int32 codes [B, h, w]."""
    self._check_images(images_BHWC)
    return self._encode(self.params, jnp.asarray(images_BHWC, jnp.float32))

  def decode(self, codes_Bhw):
    """int codes [B, h, w] -> images [B, H, W, 3]."""
    codes = np.asarray(codes_Bhw) if not isinstance(codes_Bhw, jax.Array) else codes_Bhw
    if codes.ndim != 3 or not jnp.issubdtype(codes.dtype, jnp.integer):
      raise AutoencoderError(f"decode expects int codes [B, h, w], got {codes.dtype} {tuple(codes.shape)}")
    return self._decode(self.params, jnp.asarray(codes, jnp.int32))


def save_metadata(workdir, cfg: nets.NetConfig, vq: VQConfig, **extra) -> dict:
  """WORKDIR/autoencoder.json of a VQ tokenizer (kind "vq"; no latent scaling: codes are not diffused)."""
  return vae.save_metadata(workdir, cfg, scaling_factor=1.0, shift_factor=0.0, kind="vq",
                           vq=dataclasses.asdict(vq), **extra)


def is_vq(meta: dict) -> bool:
  return meta.get("kind") == "vq"


def load(workdir, step: int | None = None) -> VQAutoencoder:
  """The trained tokenizer of a `tfx.train_autoencoder` workdir (latest checkpoint unless `step`)."""
  meta = vae.read_metadata(workdir)
  if not is_vq(meta):
    raise AutoencoderError(f"{workdir} holds a KL-VAE, not a VQ tokenizer; use autoencoder.kind='vae'")
  graphdef, state = abstract_net(vae.net_config_from_meta(meta), VQConfig(**meta["vq"]))
  return VQAutoencoder(nnx.merge(graphdef, vae.restore_params(workdir, state, step)))
