"""Cosine schedule, q_sample/targets, DDIM/DDPM with an oracle predictor, CFG."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfx import diffusion


@pytest.fixture(scope="module")
def schedule():
  return diffusion.cosine_schedule(1000)


def test_schedule_matches_closed_form(schedule):
  s, T = 0.008, 1000
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
  ab = np.asarray(schedule.alphas_cumprod, np.float64)
  for t in [0, 1, 10, 250, 500, 750, 900, 990]:
    assert abs(ab[t] - f(t + 1) / f(0)) < 1e-6, t
  assert np.all(np.diff(ab) < 0) and np.all(np.asarray(schedule.betas) <= 0.999 + 1e-7)
  assert ab[-1] < 1e-4 and ab[0] > 0.9999


def test_schedule_shift_divides_snr():
  snr = lambda ab: ab / (1 - ab)
  base = np.asarray(diffusion.cosine_schedule(1000).alphas_cumprod, np.float64)
  shifted = np.asarray(diffusion.cosine_schedule(1000, shift=4.0).alphas_cumprod, np.float64)
  t = np.array([0, 100, 500, 900, 990])
  np.testing.assert_allclose(snr(shifted[t]) * 16, snr(base[t]), rtol=1e-3)
  with pytest.raises(ValueError, match="schedule_shift"):
    diffusion.cosine_schedule(1000, shift=0.5)


def test_v_target_roundtrip(schedule):
  rng = np.random.default_rng(0)
  x0, eps = (jnp.asarray(rng.normal(size=(3, 5)), jnp.float32) for _ in range(2))
  t = jnp.asarray([0, 400, 999])
  x_t = diffusion.q_sample(schedule, x0, t, eps)
  v = diffusion.target(schedule, x0, t, eps, "v")
  ab = np.asarray(schedule.alphas_cumprod)[[0, 400, 999]][:, None]
  np.testing.assert_allclose(v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, atol=1e-6)
  x0_hat, eps_hat = diffusion.predict_x0_eps(schedule, x_t, t, v, "v")
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4)
  x0_hat, eps_hat = diffusion.predict_x0_eps(schedule, x_t, t, x0, "x0")
  np.testing.assert_allclose(x0_hat, x0, atol=1e-6)
  np.testing.assert_allclose(eps_hat[1:], eps[1:], atol=1e-4)   # t=0: divides by sqrt(1 - abar) ~ 6e-3
  with pytest.raises(ValueError, match="prediction"):
    diffusion.target(schedule, x0, t, eps, "x_start")


def _oracle(schedule, x0, prediction):
  def predict(x_t, t):
    ab = diffusion.alpha_bar(schedule, t)
    eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
    return diffusion.target(schedule, x0, t, eps, prediction)
  return predict


# eps-prediction in one step from t=999 is ill-conditioned in fp32 (x0 error ~ 1e-7 / sqrt(abar_999)
# ~ 2e-3), so its one-step case is left to v-prediction.
@pytest.mark.parametrize("prediction,steps", [("eps", 2), ("eps", 7), ("eps", 50), ("v", 1), ("v", 7),
                                             ("x0", 1), ("x0", 7), ("x0", 50)])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_with_oracle_recovers_x0(schedule, prediction, steps, sampler):
  key = jax.random.PRNGKey(steps)
  x0 = jax.random.normal(key, (4, 16)) * 0.7
  predict = _oracle(schedule, x0, prediction)
  ts = diffusion.sample_timesteps(steps)
  assert ts[0] == 999 and ts[-1] == (0 if steps > 1 else 999) and len(set(ts)) == steps
  x = jax.random.normal(jax.random.PRNGKey(99), x0.shape)
  for i, (t, t_prev) in enumerate(zip(ts, diffusion.previous_timesteps(ts))):
    out = predict(x, t)
    if sampler == "ddim":
      x = diffusion.ddim_step(schedule, x, t, t_prev, out, prediction)
    else:
      noise = jax.random.normal(jax.random.PRNGKey(1000 + i), x0.shape)
      x = diffusion.ddpm_step(schedule, x, t, t_prev, out, prediction, noise)
  np.testing.assert_allclose(x, x0, atol=1e-4)


def test_ddim_intermediate_matches_q_sample_of_oracle_noise(schedule):
  """With eta=0 and the true eps, a DDIM step lands exactly on q_sample(x0, t_prev, eps)."""
  x0 = jnp.linspace(-1, 1, 12)
  eps = jnp.cos(jnp.arange(12.0))
  x_t = diffusion.q_sample(schedule, x0, 800, eps)
  x_prev = diffusion.ddim_step(schedule, x_t, 800, 300, eps, "eps")
  np.testing.assert_allclose(x_prev, diffusion.q_sample(schedule, x0, 300, eps), atol=1e-5)


def test_cfg_combine():
  cond, uncond = jnp.asarray([1.0, 2.0]), jnp.asarray([0.0, 1.0])
  np.testing.assert_allclose(diffusion.cfg_combine(cond, uncond, 1.0), cond)
  np.testing.assert_allclose(diffusion.cfg_combine(cond, uncond, 0.0), uncond)
  np.testing.assert_allclose(diffusion.cfg_combine(cond, uncond, 3.0), [3.0, 4.0])


def test_guidance_scales_hold_cfg_scale_inside_the_interval_only():
  ts = diffusion.sample_timesteps(50, 1000)   # 999 ... 0
  np.testing.assert_array_equal(diffusion.guidance_scales(ts, 3.0, (0.0, 1.0), 1000), np.full(50, 3.0))
  scales = diffusion.guidance_scales(ts, 5.0, (0.0, 0.6), 1000)
  np.testing.assert_array_equal(scales, np.where(ts <= 599, 5.0, 1.0))   # t / 999 <= 0.6
  assert 0 < (scales == 5.0).sum() < 50 and scales.dtype == np.float32
  np.testing.assert_array_equal(diffusion.guidance_scales(ts, 5.0, (0.2, 0.8), 1000),
                                np.where((ts >= 199.8) & (ts <= 799.2), 5.0, 1.0))
  assert diffusion.check_cfg_interval([0, 1]) == (0.0, 1.0)
  for bad, message in (((0.7, 0.2), "0 <= lo <= hi <= 1"), ((-0.1, 0.5), "0 <= lo <= hi <= 1"),
                       ((0.0, 1.5), "0 <= lo <= hi <= 1"), ((0.5,), "two numbers"), ("ab", "two numbers"),
                       (0.5, "two numbers")):
    with pytest.raises(ValueError, match=f"diffusion.cfg_interval must .*{re.escape(message)}"):
      diffusion.guidance_scales(ts, 3.0, bad, 1000)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_clip_x0_bounds_x0_and_keeps_the_step_consistent(schedule, prediction):
  """clip_x0 bounds the predicted x0 and re-derives eps from it (x_t = sqrt(ab) x0 + sqrt(1-ab) eps
  still holds); 0 leaves both as they were; a bound the prediction never reaches changes nothing."""
  rng = np.random.default_rng(1)
  x_t, out = (jnp.asarray(3 * rng.normal(size=(4, 6)), jnp.float32) for _ in range(2))
  t = jnp.asarray([10, 300, 600, 999])
  x0, eps = diffusion.predict_x0_eps(schedule, x_t, t, out, prediction)
  assert float(jnp.abs(x0).max()) > 1   # the case clipping is for
  cx0, ceps = diffusion.predict_x0_eps(schedule, x_t, t, out, prediction, clip_x0=1.0)
  np.testing.assert_array_equal(cx0, jnp.clip(x0, -1, 1))
  ab = np.asarray(diffusion.alpha_bar(schedule, t))[:, None]
  np.testing.assert_allclose(np.sqrt(ab) * cx0 + np.sqrt(1 - ab) * ceps, x_t, rtol=1e-4, atol=1e-4)
  same = diffusion.predict_x0_eps(schedule, x_t, t, out, prediction, clip_x0=1e6)
  np.testing.assert_allclose(same[0], x0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(same[1], eps, rtol=1e-4, atol=1e-4)
  # the samplers step towards the clipped x0
  step = diffusion.ddim_step(schedule, x_t, t, t - 10, out, prediction, clip_x0=1.0)
  ab_prev = np.asarray(diffusion.alpha_bar(schedule, t - 10))[:, None]
  np.testing.assert_allclose(step, np.sqrt(ab_prev) * cx0 + np.sqrt(1 - ab_prev) * ceps, rtol=1e-4, atol=1e-4)
  noise = jnp.zeros_like(x_t)
  assert not np.allclose(diffusion.ddpm_step(schedule, x_t, t, t - 10, out, prediction, noise, 1.0),
                         diffusion.ddpm_step(schedule, x_t, t, t - 10, out, prediction, noise))


def test_check_clip_x0():
  assert diffusion.check_clip_x0(0) == 0.0 and diffusion.check_clip_x0("1.5") == 1.5
  for bad in (-1.0, float("nan"), float("inf"), "abc", None):
    with pytest.raises(ValueError, match=re.escape(f"diffusion.clip_x0 must be a number >= 0 (0 = off), got {bad!r}")):
      diffusion.check_clip_x0(bad)
