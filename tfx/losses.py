"""The Transfusion objective: L = lm_loss + lambda * diff_loss, as pure functions.

lm_loss: mean cross-entropy over lm_mask, computed by `chunked_nll_sum` without ever
holding the [B, L, V] logits. diff_loss: one timestep per image
(per (row, image_id)), drawn on device; noise-limited images draw t <= noise_limit;
squared error of the eps/v prediction averaged over each image's elements, then
over the images present. Padding and the other modality contribute nothing; a
batch with no text or no images gives 0 for that term, never NaN. In
model.image_mode "discrete" (tfx/image_codes.py) images are code tokens: the LM loss
covers them, and the metrics split it into text_loss and image_loss.
"""
import jax
import jax.numpy as jnp

from tfx import diffusion, image_codes, mesh, record

_LOGITS = ("act_batch", "act_len", "act_vocab")


def _stratified_uniform(rng, present_BI):
  """[B, I] draws in [0, 1) whose present entries, N of them, fall one in each of N equal strata
  (a random stratum each): the batch's images cover the timesteps evenly, where N independent
  draws leave gaps and clusters (a lower-variance estimate of the loss over t)."""
  key_rng, offset_rng = jax.random.split(rng)
  keys = jnp.where(present_BI, jax.random.uniform(key_rng, present_BI.shape), 2.0).reshape(-1)
  rank = jnp.zeros(keys.shape, jnp.int32).at[jnp.argsort(keys)].set(jnp.arange(keys.size, dtype=jnp.int32))
  n = jnp.maximum(present_BI.sum(), 1).astype(jnp.float32)
  offset = jax.random.uniform(offset_rng, keys.shape)
  return jnp.minimum((rank + offset) / n, 1.0).reshape(present_BI.shape)


def draw_timesteps_and_noise(rng, batch, diffusion_config):
  """(t_BL int32: one t per image, 0 on text; eps_BLP standard normal)."""
  image_ids_BL = batch["image_ids"]
  B, L = image_ids_BL.shape
  t_rng, eps_rng = jax.random.split(rng)
  sampling = diffusion.check_timestep_sampling(diffusion_config.timestep_sampling)
  if sampling == "stratified":
    _, present_BI = per_image_mean(jnp.zeros((B, L)), image_ids_BL, batch["modality"] == record.IMAGE)
    u_BI = _stratified_uniform(t_rng, present_BI)
  else:
    u_BI = jax.random.uniform(t_rng, (B, L + 1))
  u_BI = diffusion.timestep_fraction(u_BI, diffusion_config)  # under a noise limit: of [0, cap]
  u_BL = jnp.take_along_axis(u_BI, jnp.clip(image_ids_BL, 0, L), axis=1)
  T = diffusion_config.num_timesteps
  cap_BL = jnp.where(batch["noise_limited"] > 0, min(diffusion_config.noise_limit, T - 1), T - 1)
  t_BL = jnp.minimum(jnp.floor(u_BL * (cap_BL + 1)).astype(jnp.int32), cap_BL)
  t_BL = jnp.where(batch["modality"] == record.IMAGE, t_BL, 0)
  eps_BLP = jax.random.normal(eps_rng, batch["patches"].shape, jnp.float32)
  return t_BL, eps_BLP


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


def diffusion_sum(out_BLP, target_BLP, weight_BL, image_ids_BL, modality_BL):
  """(sum over images of weight * mean squared error over the image's elements, images present)."""
  is_image_BL = modality_BL == record.IMAGE
  err_BL = jnp.mean(jnp.square(out_BLP.astype(jnp.float32) - target_BLP), axis=-1) * weight_BL
  mean_BI, present_BI = per_image_mean(err_BL, image_ids_BL, is_image_BL)
  return jnp.sum(jnp.where(present_BI, mean_BI, 0.0)), present_BI.sum().astype(jnp.float32)


def token_log_probs(logits_BLV, targets_BL):
  """log p(target) per position under the logits (fp32): for scoring, where [B, L, V] fits."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]


def _nll_sum(head, h_BCD, targets_BC, mask_BC, split_at=None):
  """Sum over mask of -log p(target): one chunk's logits live only inside this function.
  With `split_at`, [that sum, its part on targets >= split_at]."""
  logits_BCV = mesh.constrain(head(h_BCD).astype(jnp.float32), _LOGITS)
  logz_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
  target_logit_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
  nll_BC = (logz_BC - target_logit_BC) * mask_BC
  if split_at is None:
    return jnp.sum(nll_BC)
  return jnp.stack([jnp.sum(nll_BC), jnp.sum(jnp.where(targets_BC >= split_at, nll_BC, 0.0))])


def chunked_nll_sum(head, h_BLD, targets_BL, mask_BL, chunk: int, split_at=None):
  """(sum over mask of the cross-entropy of head(h), masked tokens), `chunk` positions per row at a time.

  Each row's masked (text) positions are first moved to its front (a stable per-row
  sort, so the batch sharding is untouched); chunks then run in a scan, and a chunk
  past every row's last text position is skipped (lax.cond), so the head runs on
  about max-over-rows(text) positions instead of L. Each chunk is under
  jax.checkpoint: the backward pass recomputes its [B, chunk, V] logits rather than
  storing them. chunk <= 0 or >= L: one chunk of all positions (the head on [B, L, V]).
  With `split_at` the sum is [all, part on targets >= split_at] (discrete images' codes).
  """
  mask_BL = mask_BL.astype(jnp.float32)
  count = mask_BL.sum()
  B, L = targets_BL.shape
  if chunk <= 0 or chunk >= L:
    return _nll_sum(head, h_BLD, targets_BL, mask_BL, split_at), count
  order_BL = jnp.argsort((mask_BL <= 0).astype(jnp.int32), axis=1, stable=True)  # text first, in order
  h_BLD = jnp.take_along_axis(h_BLD, order_BL[..., None], axis=1)
  targets_BL = jnp.take_along_axis(targets_BL, order_BL, axis=1)
  mask_BL = jnp.take_along_axis(mask_BL, order_BL, axis=1)
  K = -(-L // chunk)
  pad = K * chunk - L  # lengths that are not a multiple of the chunk: masked-out padding
  h_BLD = jnp.pad(h_BLD, ((0, 0), (0, pad), (0, 0)))
  targets_BL, mask_BL = jnp.pad(targets_BL, ((0, 0), (0, pad))), jnp.pad(mask_BL, ((0, 0), (0, pad)))
  # [B, K*C, ...] -> [K, B, C, ...]: the scan walks chunks; the batch axis keeps its sharding.
  h_KBCD = mesh.constrain(h_BLD.reshape(B, K, chunk, -1).swapaxes(0, 1),
                          (None, "act_batch", "act_len", "act_embed"))
  targets_KBC = targets_BL.reshape(B, K, chunk).swapaxes(0, 1)
  mask_KBC = mask_BL.reshape(B, K, chunk).swapaxes(0, 1)
  longest = mask_BL.sum(axis=1).max()  # text positions of the row that has the most
  nll = jax.checkpoint(lambda h, t, m: _nll_sum(head, h, t, m, split_at))
  shape = () if split_at is None else (2,)

  def body(total, xs):
    k, h_BCD, t_BC, m_BC = xs
    part = jax.lax.cond(k * chunk < longest, nll, lambda *_: jnp.zeros(shape, jnp.float32), h_BCD, t_BC, m_BC)
    return total + part, None

  total, _ = jax.lax.scan(body, jnp.zeros(shape, jnp.float32), (jnp.arange(K), h_KBCD, targets_KBC, mask_KBC))
  return total, count


def transfusion_loss(model, batch, rng, config, *, noise=None, totals=None):
  """(loss, metrics) for one batch; uses `model.features(batch, t_BL)` and `model.logits(h)`.

  noise: (t_BL, eps_BLP) for this batch, else drawn from rng. totals: (text_tokens,
  images) of a whole step's batch of which this batch is one micro-batch (see
  `accumulation_inputs`); every metric is then this micro-batch's additive share, so
  summing the micro-batches' metrics (and gradients) gives the whole batch's exactly.
  """
  d = config.diffusion
  schedule = diffusion.make_schedule(d)
  t_BL, eps_BLP = noise if noise is not None else draw_timesteps_and_noise(rng, batch, d)
  x0_BLP = batch["patches"].astype(jnp.float32)
  is_image_BL1 = (batch["modality"] == record.IMAGE)[..., None]
  x_t_BLP = jnp.where(is_image_BL1, diffusion.q_sample(schedule, x0_BLP, t_BL, eps_BLP), 0.0)
  h_BLD, out_BLP, _ = model.features(dict(batch, patches=x_t_BLP), t_BL.astype(jnp.float32))
  split_at = config.model.vocab_size if image_codes.is_discrete(config) else None  # code 0's token id
  nll, text_tokens = chunked_nll_sum(model.logits, h_BLD, batch["lm_targets"], batch["lm_mask"],
                                     int(config.model.loss_chunk), split_at)
  if split_at is not None:
    nll, code_nll = nll[0], nll[1]
  target_BLP = diffusion.target(schedule, x0_BLP, t_BL, eps_BLP, d.prediction)
  weight_BL = snr_weight(schedule, t_BL, d)
  diff_sum, images = diffusion_sum(out_BLP, target_BLP, weight_BL, batch["image_ids"], batch["modality"])
  text_total, image_total = (text_tokens, images) if totals is None else totals[:2]
  lm = nll / jnp.maximum(text_total, 1.0)
  diff = diff_sum / jnp.maximum(image_total, 1.0)
  loss = lm + d.loss_weight * diff
  metrics = dict(loss=loss, lm_loss=lm, diff_loss=diff, text_tokens=text_tokens, images=images)
  if split_at is not None:   # text_tokens counts every LM target, codes included (the head runs there)
    code_tokens = code_target_count(batch, split_at)
    code_total = code_tokens if totals is None else totals[2]
    metrics |= dict(text_loss=(nll - code_nll) / jnp.maximum(text_total - code_total, 1.0),
                    image_loss=code_nll / jnp.maximum(code_total, 1.0), image_tokens=code_tokens)
  return loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def code_target_count(batch, split_at: int) -> jax.Array:
  """LM targets that are image codes (token id >= split_at) in the batch."""
  return jnp.sum(batch["lm_mask"].astype(jnp.float32) * (batch["lm_targets"] >= split_at))


def count_images(batch) -> jax.Array:
  """Images present in the batch (distinct (row, image_id) over image positions)."""
  is_image_BL = batch["modality"] == record.IMAGE
  _, present_BI = per_image_mean(jnp.zeros(is_image_BL.shape, jnp.float32), batch["image_ids"], is_image_BL)
  return present_BI.sum().astype(jnp.float32)


def accumulation_inputs(batch, rng, config):
  """(noise, totals) for the whole step's batch, to be sliced per micro-batch.

  The noise is drawn once for the whole batch, so the micro-batches see exactly the
  timesteps and noise a single full-batch step would.
  """
  noise = draw_timesteps_and_noise(rng, batch, config.diffusion)
  totals = (batch["lm_mask"].astype(jnp.float32).sum(), count_images(batch))
  if image_codes.is_discrete(config):
    totals += (code_target_count(batch, config.model.vocab_size),)
  return noise, totals
