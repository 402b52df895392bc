"""Gaussian diffusion as pure functions on jnp arrays: cosine schedule, q_sample, targets,
DDPM/DDIM steps with any number of steps, classifier-free guidance.

Timesteps are integers 0..T-1; `alphas_cumprod[t]` is the signal fraction after t+1 noising
steps. A step to t_prev = -1 means "to the clean sample" (alpha_bar = 1).
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal's cosine schedule
MAX_BETA = 0.999


class Schedule(NamedTuple):
  betas: jax.Array            # float32 [T]
  alphas_cumprod: jax.Array   # float32 [T]

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def cosine_alpha_bar(u):
  """Nichol & Dhariwal's f(u)/f(0) for u = t/T in [0, 1] (numpy, float64)."""
  f = lambda x: np.cos((x + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
  return f(np.asarray(u, np.float64)) / f(0.0)


def cosine_schedule(num_timesteps: int = 1000, shift: float = 1.0) -> Schedule:
  """betas_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999); alphas_cumprod = cumprod(1 - betas).

  `shift` s > 1 divides every signal-to-noise ratio abar / (1 - abar) by s^2 (log-SNR
  minus 2 log s, as simple diffusion shifts for resolution): more of the steps fall
  where the noise hides an image's layout, which is what a caption decides."""
  if shift < 1:
    raise ValueError(f"diffusion.schedule_shift must be >= 1, got {shift}")
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  ab = cosine_alpha_bar(u)
  ab = ab / (ab + shift ** 2 * (1 - ab))
  betas = np.minimum(1 - ab[1:] / ab[:-1], MAX_BETA)
  return Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(np.cumprod(1 - betas), jnp.float32))


def make_schedule(diffusion_config) -> Schedule:
  """The schedule named by config.diffusion."""
  if diffusion_config.schedule != "cosine":
    raise ValueError(f"diffusion.schedule must be 'cosine', got {diffusion_config.schedule!r}")
  return cosine_schedule(diffusion_config.num_timesteps, diffusion_config.schedule_shift)


PREDICTIONS = ("eps", "v", "x0")


def _check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {prediction!r}")


def alpha_bar(schedule: Schedule, t):
  """alpha_bar at integer t (any shape); 1.0 where t < 0."""
  t = jnp.asarray(t, jnp.int32)
  ab = schedule.alphas_cumprod[jnp.clip(t, 0, schedule.num_timesteps - 1)]
  return jnp.where(t < 0, 1.0, ab)


def _bcast(a, x):
  return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(schedule: Schedule, x0, t, eps):
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; t broadcasts over x0's leading axes."""
  ab = _bcast(alpha_bar(schedule, t), x0)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps


def target(schedule: Schedule, x0, t, eps, prediction: str):
  """The model's regression target: eps, x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
  _check_prediction(prediction)
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  ab = _bcast(alpha_bar(schedule, t), x0)
  return jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0


def predict_x0_eps(schedule: Schedule, x_t, t, model_out, prediction: str, clip_x0: float = 0.0):
  """(x0_hat, eps_hat) from the model output (eps, v or x0) at x_t.

  clip_x0 > 0 clips x0_hat to [-clip_x0, clip_x0] (the data's range) and re-derives eps_hat from
  it, so the sampler's step stays on the line from x_t to the clipped x0_hat (DDPM's clip_denoised).

  With eps at t near T-1, x0_hat divides by sqrt(abar) ~ 5e-5, so fp32 rounding
  in x_t alone costs ~2e-3; v-prediction has no such division. x0's eps_hat
  divides by sqrt(1 - abar) (~6e-3 at t=0), but samplers scale it by as much again."""
  _check_prediction(prediction)
  ab = _bcast(alpha_bar(schedule, t), x_t)
  if prediction == "eps":
    eps = model_out
    x0 = (x_t - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
  elif prediction == "x0":
    x0 = model_out
    eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
  else:
    x0 = jnp.sqrt(ab) * x_t - jnp.sqrt(1 - ab) * model_out
    eps = jnp.sqrt(1 - ab) * x_t + jnp.sqrt(ab) * model_out
  if clip_x0 > 0:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
  return x0, eps


def check_clip_x0(clip_x0) -> float:
  """diffusion.clip_x0 as a float: 0 (off) or a positive bound."""
  try:
    value = float(clip_x0)
  except (TypeError, ValueError):
    value = float("nan")
  if not 0 <= value < float("inf"):
    raise ValueError(f"diffusion.clip_x0 must be a number >= 0 (0 = off), got {clip_x0!r}")
  return value


def check_best_of(best_of) -> int:
  """diffusion.best_of as an int >= 1."""
  if isinstance(best_of, bool) or not isinstance(best_of, (int, np.integer)) or best_of < 1:
    raise ValueError(f"diffusion.best_of must be an integer >= 1 (1 = no reranking), got {best_of!r}")
  return int(best_of)


TIMESTEP_SAMPLING = ("uniform", "stratified")


def check_timestep_sampling(sampling) -> str:
  """diffusion.timestep_sampling, checked: "uniform" or "stratified"."""
  if sampling not in TIMESTEP_SAMPLING:
    raise ValueError(f"diffusion.timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {sampling!r}")
  return sampling


TIMESTEP_DENSITY = ("uniform", "logit_normal")


def check_timestep_density(diffusion_config) -> str:
  """diffusion.timestep_density, checked with its diffusion.logit_normal (mean, std) and
  diffusion.timestep_uniform_share."""
  density = diffusion_config.timestep_density
  if density not in TIMESTEP_DENSITY:
    raise ValueError(f"diffusion.timestep_density must be one of {TIMESTEP_DENSITY}, got {density!r}")
  try:
    mean, std = (float(v) for v in diffusion_config.logit_normal)
    ok = math.isfinite(mean) and math.isfinite(std) and std > 0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"diffusion.logit_normal must be (mean, std) with std > 0, got {diffusion_config.logit_normal!r}")
  share = diffusion_config.get("timestep_uniform_share", 0.0)
  try:
    ok = 0.0 <= float(share) <= 1.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"diffusion.timestep_uniform_share must be a number in [0, 1], got {share!r}")
  return density


def timestep_fraction(u, diffusion_config):
  """Draws u, uniform in [0, 1), mapped to the fraction of the timestep range to train on:
  unchanged, or logit-normal (sigmoid of N(mean, std); Esser et al., 2024), most draws
  mid-range, mixed with a uniform share (diffusion.timestep_uniform_share) that keeps the
  ends of the range trained. Through the density's inverse CDF, so stratified draws stay
  stratified: the normal's in closed form, the mixture's interpolated on a grid of 4097
  points (a quarter of a timestep of 1000)."""
  if check_timestep_density(diffusion_config) == "uniform":
    return u
  mean, std = diffusion_config.logit_normal
  share = float(diffusion_config.get("timestep_uniform_share", 0.0))
  if share == 0.0:
    return jax.nn.sigmoid(mean + std * jax.scipy.special.ndtri(u))
  x = jnp.linspace(0.0, 1.0, 4097)
  cdf = share * x + (1.0 - share) * jax.scipy.special.ndtr((jnp.log(x) - jnp.log1p(-x) - mean) / std)
  return jnp.interp(u, cdf, x)


def sample_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
  """`num_steps` evenly spaced timesteps from T-1 down to 0 (int32, descending, distinct; [T-1] for one)."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"sample steps must be in 1..{num_timesteps}, got {num_steps}")
  return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
  """t_prev for each step of a descending sequence; -1 after the last."""
  return np.append(timesteps[1:], -1).astype(np.int32)


def ddim_step(schedule: Schedule, x_t, t, t_prev, model_out, prediction: str, *, eta: float = 0.0,
              noise=None, clip_x0: float = 0.0):
  """One DDIM step x_t -> x_{t_prev}; eta=0 is deterministic, eta=1 matches DDPM's variance."""
  x0, eps = predict_x0_eps(schedule, x_t, t, model_out, prediction, clip_x0)
  ab, ab_prev = _bcast(alpha_bar(schedule, t), x_t), _bcast(alpha_bar(schedule, t_prev), x_t)
  sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
  x_prev = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0)) * eps
  if eta > 0:
    if noise is None:
      raise ValueError("ddim_step with eta > 0 needs noise")
    x_prev = x_prev + sigma * noise
  return x_prev


def ddpm_step(schedule: Schedule, x_t, t, t_prev, model_out, prediction: str, noise, clip_x0: float = 0.0):
  """Ancestral step from the posterior q(x_{t_prev} | x_t, x0_hat); works for skipped steps too."""
  x0, _ = predict_x0_eps(schedule, x_t, t, model_out, prediction, clip_x0)
  ab, ab_prev = _bcast(alpha_bar(schedule, t), x_t), _bcast(alpha_bar(schedule, t_prev), x_t)
  alpha = ab / ab_prev
  mean = (jnp.sqrt(ab_prev) * (1 - alpha) * x0 + jnp.sqrt(alpha) * (1 - ab_prev) * x_t) / (1 - ab)
  var = (1 - alpha) * (1 - ab_prev) / (1 - ab)
  return mean + jnp.sqrt(var) * noise


def cfg_combine(cond, uncond, scale: float):
  """Classifier-free guidance: uncond + scale * (cond - uncond)."""
  return uncond + scale * (cond - uncond)


def check_cfg_interval(interval) -> tuple[float, float]:
  """diffusion.cfg_interval as (lo, hi) floats; raises ValueError unless 0 <= lo <= hi <= 1."""
  try:
    lo, hi = (float(v) for v in interval)
  except (TypeError, ValueError):
    raise ValueError(f"diffusion.cfg_interval must be two numbers (lo, hi), got {interval!r}") from None
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"diffusion.cfg_interval must satisfy 0 <= lo <= hi <= 1, got ({lo:g}, {hi:g})")
  return lo, hi


def guidance_scales(timesteps: np.ndarray, cfg_scale: float, interval, num_timesteps: int) -> np.ndarray:
  """Per-step guidance scales (float32): `cfg_scale` at the steps whose t / (T - 1) lies in
  [lo, hi] of `interval`, 1 (the conditional prediction alone) elsewhere: guidance limited to
  an interval of noise levels (Kynkaanniemi et al., 2024)."""
  lo, hi = check_cfg_interval(interval)
  u = np.asarray(timesteps, np.float64) / max(num_timesteps - 1, 1)
  return np.where((u >= lo) & (u <= hi), np.float32(cfg_scale), np.float32(1.0)).astype(np.float32)
