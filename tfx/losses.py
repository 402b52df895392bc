"""The Transfusion objective: L = lm_loss + lambda * diff_loss, as pure functions.

lm_loss: mean cross-entropy over lm_mask. diff_loss: one timestep per image
(per (row, image_id)), drawn on device; noise-limited images draw t <= noise_limit;
squared error of the eps/v prediction averaged over each image's elements, then
over the images present. Padding and the other modality contribute nothing; a
batch with no text or no images gives 0 for that term, never NaN.
"""
import jax
import jax.numpy as jnp

from tfx import diffusion, record


def draw_timesteps_and_noise(rng, batch, diffusion_config):
  """(t_BL int32: one t per image, 0 on text; eps_BLP standard normal)."""
  image_ids_BL = batch["image_ids"]
  B, L = image_ids_BL.shape
  t_rng, eps_rng = jax.random.split(rng)
  u_BI = jax.random.uniform(t_rng, (B, L + 1))
  u_BL = jnp.take_along_axis(u_BI, jnp.clip(image_ids_BL, 0, L), axis=1)
  T = diffusion_config.num_timesteps
  cap_BL = jnp.where(batch["noise_limited"] > 0, min(diffusion_config.noise_limit, T - 1), T - 1)
  t_BL = jnp.minimum(jnp.floor(u_BL * (cap_BL + 1)).astype(jnp.int32), cap_BL)
  t_BL = jnp.where(batch["modality"] == record.IMAGE, t_BL, 0)
  eps_BLP = jax.random.normal(eps_rng, batch["patches"].shape, jnp.float32)
  return t_BL, eps_BLP


def lm_loss(logits_BLV, targets_BL, mask_BL):
  """(mean cross-entropy over mask, number of masked tokens)."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  mask_BL = mask_BL.astype(jnp.float32)
  count = mask_BL.sum()
  return jnp.sum((logz_BL - target_logit_BL) * mask_BL) / jnp.maximum(count, 1.0), count


def per_image_mean(values_BL, image_ids_BL, is_image_BL):
  """(mean of values over each (row, image_id) [B, L+1], present [B, L+1]); slot 0 = text."""
  B, L = image_ids_BL.shape
  ids_BL = jnp.where(is_image_BL, jnp.clip(image_ids_BL, 1, L), 0) + (L + 1) * jnp.arange(B)[:, None]
  n = B * (L + 1)
  sums = jax.ops.segment_sum(jnp.where(is_image_BL, values_BL, 0.0).reshape(-1), ids_BL.reshape(-1), n)
  counts = jax.ops.segment_sum(is_image_BL.astype(jnp.float32).reshape(-1), ids_BL.reshape(-1), n)
  present = (counts > 0).reshape(B, L + 1).at[:, 0].set(False)
  return (sums / jnp.maximum(counts, 1.0)).reshape(B, L + 1), present


def snr_weight(schedule, t_BL, diffusion_config):
  """Per-position loss weight from config.diffusion.loss_weighting."""
  kind = diffusion_config.loss_weighting
  if kind == "none":
    return jnp.ones(t_BL.shape, jnp.float32)
  if kind in ("min_snr", "clipped_v"):
    ab = diffusion.alpha_bar(schedule, t_BL)
    snr = ab / (1 - ab)
    # the weight on the squared error in x0: min-SNR, or the v-loss's SNR + 1 with SNR clipped
    x0_weight = jnp.minimum(snr, diffusion_config.min_snr_gamma) + (kind == "clipped_v")
    # the squared error in eps is SNR x (error in x0), in v (SNR + 1) x (error in x0)
    scale = {"eps": snr, "v": snr + 1, "x0": 1.0}[diffusion_config.prediction]
    return x0_weight / scale
  raise ValueError(f"diffusion.loss_weighting must be 'none', 'min_snr' or 'clipped_v', got {kind!r}")


def diffusion_loss(out_BLP, target_BLP, weight_BL, image_ids_BL, modality_BL):
  """(mean over images of weight * mean squared error over the image's elements, images present)."""
  is_image_BL = modality_BL == record.IMAGE
  err_BL = jnp.mean(jnp.square(out_BLP.astype(jnp.float32) - target_BLP), axis=-1) * weight_BL
  mean_BI, present_BI = per_image_mean(err_BL, image_ids_BL, is_image_BL)
  images = present_BI.sum().astype(jnp.float32)
  return jnp.sum(jnp.where(present_BI, mean_BI, 0.0)) / jnp.maximum(images, 1.0), images


def transfusion_loss(model, batch, rng, config):
  """(loss, metrics) for one batch; `model(batch, t_BL)` -> (logits_BLV, patch_out_BLP, _)."""
  d = config.diffusion
  schedule = diffusion.make_schedule(d)
  t_BL, eps_BLP = draw_timesteps_and_noise(rng, batch, d)
  x0_BLP = batch["patches"].astype(jnp.float32)
  is_image_BL1 = (batch["modality"] == record.IMAGE)[..., None]
  x_t_BLP = jnp.where(is_image_BL1, diffusion.q_sample(schedule, x0_BLP, t_BL, eps_BLP), 0.0)
  logits_BLV, out_BLP, _ = model(dict(batch, patches=x_t_BLP), t_BL.astype(jnp.float32))
  lm, text_tokens = lm_loss(logits_BLV, batch["lm_targets"], batch["lm_mask"])
  target_BLP = diffusion.target(schedule, x0_BLP, t_BL, eps_BLP, d.prediction)
  weight_BL = snr_weight(schedule, t_BL, d)
  diff, images = diffusion_loss(out_BLP, target_BLP, weight_BL, batch["image_ids"], batch["modality"])
  loss = lm + d.loss_weight * diff
  metrics = dict(loss=loss, lm_loss=lm, diff_loss=diff, text_tokens=text_tokens, images=images)
  return loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
