"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, EMA helper."""
import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `end_lr` at `total_steps`."""
  warmup = max(0, min(optim_config.warmup_steps, total_steps))
  decay = max(total_steps - warmup, 1)
  cosine = optax.cosine_decay_schedule(
      init_value=optim_config.lr, decay_steps=decay, alpha=optim_config.end_lr / optim_config.lr)
  if warmup == 0:
    return cosine
  ramp = optax.linear_schedule(0.0, optim_config.lr, warmup)
  return optax.join_schedules([ramp, cosine], boundaries=[warmup])


# Path components that name a token-embedding table (never weight-decayed).
EMBEDDING_NAMES = {"embed", "embedding", "embeddings", "tok_embeddings", "wte"}
# Norm scales and biases by leaf name: with model.scan_layers they are stacked to [layers, d].
NORM_AND_BIAS_NAMES = {"scale", "bias"}


def _is_decayed(path, leaf) -> bool:
  """Weight decay on matrices and kernels only: not on norms, biases or embedding tables."""
  names = {str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path}
  return jnp.ndim(leaf) >= 2 and not names & (EMBEDDING_NAMES | NORM_AND_BIAS_NAMES)


def weight_decay_mask(params):
  """A bool tree: True where AdamW applies weight decay."""
  return jax.tree_util.tree_map_with_path(_is_decayed, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (paper defaults in config.optim) behind a global-norm clip."""
  o = config.optim
  schedule = learning_rate_schedule(o, config.total_steps)
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts)


def ema_update(ema_params, params, decay: float):
  """One step of an exponential moving average of the params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
