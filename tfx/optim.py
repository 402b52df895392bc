"""The optimizer: AdamW with warmup + cosine or WSD decay, global-norm clipping, EMA helper."""
import jax
import jax.numpy as jnp
import optax


LR_SCHEDULES = ("cosine", "wsd")


def check_lr_schedule(optim_config) -> str:
  """optim.schedule and optim.decay_fraction, checked: the schedule's name."""
  name = optim_config.schedule
  if name not in LR_SCHEDULES:
    raise ValueError(f"optim.schedule must be one of {LR_SCHEDULES}, got {name!r}")
  if name == "wsd" and not 0 < optim_config.decay_fraction <= 1:
    raise ValueError(f"optim.decay_fraction must be in (0, 1], got {optim_config.decay_fraction}")
  return name


def _sqrt_cooldown(peak: float, end: float, steps: int) -> optax.Schedule:
  """WSD's cooldown: from `peak` to `end` over `steps` as 1 - sqrt(progress) (Hagele et al., 2024)."""
  def schedule(count):
    progress = jnp.clip(count / steps, 0.0, 1.0)
    return end + (peak - end) * (1.0 - jnp.sqrt(progress))
  return schedule


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then to `end_lr` at `total_steps`.

  "cosine": a cosine decay over all the steps after warmup. "wsd" (warmup-stable-decay):
  `lr` held until the last `decay_fraction` of the steps, then a 1 - sqrt cooldown.
  """
  name = check_lr_schedule(optim_config)
  o = optim_config
  warmup = max(0, min(o.warmup_steps, total_steps))
  decay = max(total_steps - warmup, 1)
  if name == "cosine":
    after_warmup = optax.cosine_decay_schedule(init_value=o.lr, decay_steps=decay, alpha=o.end_lr / o.lr)
  else:
    cooldown = max(1, min(decay, round(o.decay_fraction * total_steps)))
    after_warmup = optax.join_schedules(
        [optax.constant_schedule(o.lr), _sqrt_cooldown(o.lr, o.end_lr, cooldown)], boundaries=[decay - cooldown])
  if warmup == 0:
    return after_warmup
  ramp = optax.linear_schedule(0.0, o.lr, warmup)
  return optax.join_schedules([ramp, after_warmup], boundaries=[warmup])


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
