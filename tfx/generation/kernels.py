"""Pure functions that run the model for generation (jitted by tfx/generation/engine.py).

Prefill writes a prompt into the KV cache; decode samples tokens one at a time
against it; denoising runs an image's n patches against a cached prefix for
every sampler step inside one `lax.fori_loop`, and commit writes the finished
image (t = 0) and EOI into the cache. Prompts in a batch are left-padded with
segment 0, which the attention mask ignores.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tfx import diffusion, losses, mesh as mesh_lib, record
from tfx.generation.sampling import sample_tokens


def shard_cache(cache):
  """Lays the KV cache [N, B, S, G, K] out on the current mesh (a no-op without one).

  Rows go over the data-like axes as the activations' batch does, and kv heads over
  tensor as the k/v projections that write them are split, so every write stays on the
  device that computed it. A dimension those axes do not divide (batch 1 of `generate`,
  say) is replicated rather than padded.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return cache

  def fits(name: str, dim: int):
    axes = mesh_lib.logical_to_spec((name,))[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return name if dim % math.prod(mesh.shape[a] for a in axes) == 0 else None

  _, B, _, G, _ = cache.k_NBSGK.shape
  kv = ("layers", fits("act_batch", B), "act_len", fits("act_heads", G), "act_kv")
  return dataclasses.replace(cache, k_NBSGK=mesh_lib.constrain(cache.k_NBSGK, kv),
                             v_NBSGK=mesh_lib.constrain(cache.v_NBSGK, kv),
                             segment_ids_BS=mesh_lib.constrain(cache.segment_ids_BS, kv[1:3]))


def forward(graphdef, params, batch, t_BL, cache, read_only: bool = False):
  logits_BLV, patch_out_BLP, cache = nnx.merge(graphdef, params)(batch, t_BL, cache=cache, read_only=read_only)
  return logits_BLV, patch_out_BLP, None if cache is None else shard_cache(cache)


def text_batch(tokens_BL, positions_BL, patch_dim: int):
  B, L = tokens_BL.shape
  ones = jnp.ones((B, L), jnp.int32)
  return dict(tokens=tokens_BL, patches=jnp.zeros((B, L, patch_dim), jnp.float32),
              modality=ones * record.TEXT, segment_ids=ones, positions=positions_BL,
              image_ids=jnp.zeros((B, L), jnp.int32))


def image_batch(x_BnP, start_B, image_id, pad_id: int):
  """An image's n patches per row; image_id is a scalar or one per row."""
  B, n, _ = x_BnP.shape
  ones = jnp.ones((B, n), jnp.int32)
  image_id = jnp.reshape(image_id, (-1, 1)) if jnp.ndim(image_id) else image_id
  return dict(tokens=ones * pad_id, patches=x_BnP, modality=ones * record.IMAGE, segment_ids=ones,
              positions=start_B[:, None] + jnp.arange(n, dtype=jnp.int32), image_ids=ones * image_id)


def _advance(cache, old_length_B, active_B, by: int):
  """Per-row lengths after a chunk of `by` positions that only `active_B` rows really added (the
  others wrote segment 0 there, which the next write at their unchanged length overwrites)."""
  return dataclasses.replace(cache, length=jnp.where(active_B, old_length_B + by, old_length_B))


def prefill(graphdef, params, batch, cache):
  """Writes a prompt chunk into the cache; returns (logits of its last position, cache)."""
  t_BL = jnp.zeros(batch["tokens"].shape, jnp.float32)
  logits_BLV, _, cache = forward(graphdef, params, batch, t_BL, cache)
  return logits_BLV[:, -1], cache


def decode(graphdef, params, cache, logits_BV, next_pos_B, rng, limit, banned_V, stop_V, *,
            max_new: int, temperature: float, top_k: int, top_p: float, patch_dim: int, pad_id: int):
  """Samples up to `limit` (<= max_new) tokens, feeding each back through the cache.

  A row is done once it samples a stop token (which is still written to the
  cache); the loop ends when every row is done. Returns (tokens_BT with PAD
  after a row's stop, steps taken, cache, logits_BV of the next position).
  """
  B = logits_BV.shape[0]

  def cond(state):
    i, _, _, done_B, _, _, _ = state
    return (i < limit) & ~jnp.all(done_B)

  def body(state):
    i, cache, logits_BV, done_B, tokens_BT, rng, params = state
    rng, key = jax.random.split(rng)
    logits_BV = jnp.where(banned_V[None], -jnp.inf, logits_BV)
    tok_B = sample_tokens(logits_BV, key, temperature=temperature, top_k=top_k, top_p=top_p)
    tok_B = jnp.where(done_B, pad_id, tok_B)
    tokens_BT = tokens_BT.at[:, i].set(tok_B)
    done_B = done_B | stop_V[tok_B]
    batch = text_batch(tok_B[:, None], (next_pos_B + i)[:, None], patch_dim)
    logits_B1V, _, cache = forward(graphdef, params, batch, jnp.zeros((B, 1), jnp.float32), cache)
    return i + 1, cache, logits_B1V[:, 0], done_B, tokens_BT, rng, params

  # params ride in the loop state: NNX transforms inside the model (scan over layers) need the
  # module's arrays at the loop's own trace level
  state = (jnp.int32(0), cache, logits_BV, jnp.zeros((B,), bool), jnp.full((B, max_new), pad_id, jnp.int32),
           rng, params)
  steps, cache, logits_BV, _, tokens_BT, _, _ = jax.lax.while_loop(cond, body, state)
  return tokens_BT, steps, cache, logits_BV


def denoise_loop(predict, params, schedule, x_T_BnP, keys_B, cfg_scale, *, steps: int, sampler: str,
                  prediction: str, guided: bool, clip_x0: float = 0.0):
  """Runs `steps` sampler steps from pure noise; `predict(params, x_XnP, t)` gives [cond; uncond] outputs.
  `cfg_scale` is one guidance scale, or one per step ([steps]: diffusion.guidance_scales); clip_x0 > 0
  clips each step's predicted x0 to [-clip_x0, clip_x0] (diffusion.predict_x0_eps).

  params ride in the loop carry so that NNX transforms inside the model see them at the loop's level."""
  T = schedule.num_timesteps
  ts_np = diffusion.sample_timesteps(steps, T)
  ts, ts_prev = jnp.asarray(ts_np), jnp.asarray(diffusion.previous_timesteps(ts_np))
  B = x_T_BnP.shape[0]
  cfg_scale_S = jnp.broadcast_to(jnp.asarray(cfg_scale, jnp.float32), (steps,))

  def body(i, state):
    x_BnP, params = state
    t, t_prev = ts[i], ts_prev[i]
    out_XnP = predict(params, jnp.concatenate([x_BnP, x_BnP]) if guided else x_BnP, t)
    out_BnP = diffusion.cfg_combine(out_XnP[:B], out_XnP[B:], cfg_scale_S[i]) if guided else out_XnP
    if sampler == "ddim":
      return diffusion.ddim_step(schedule, x_BnP, t, t_prev, out_BnP, prediction, clip_x0=clip_x0), params
    noise_BnP = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x_BnP.shape[1:]))(keys_B)
    return diffusion.ddpm_step(schedule, x_BnP, t, t_prev, out_BnP, prediction, noise_BnP, clip_x0), params

  return jax.lax.fori_loop(0, steps, body, (x_T_BnP, params))[0]


def denoise_cached(graphdef, params, schedule, cache, x_T_BnP, start_X, image_id, keys_B, cfg_scale, *,
                    steps: int, sampler: str, prediction: str, guided: bool, pad_id: int,
                    read_only: bool = True, clip_x0: float = 0.0):
  """Denoises one image per row; each step runs only the n patches against the prefix `cache`.

  The cache (and `start_X`, each row's first patch position) holds the B
  conditional rows, then, when guided, the B unconditional ones. Steps only read
  the cache; read_only=False writes each step's patches into a copy of it (the
  older path, kept as the reference the read-only one is tested and timed against).
  """
  def predict(params, x_XnP, t):
    batch = image_batch(x_XnP, start_X, image_id, pad_id)
    t_XL = jnp.full(x_XnP.shape[:2], t, jnp.float32)
    return forward(graphdef, params, batch, t_XL, cache, read_only)[1]

  return denoise_loop(predict, params, schedule, x_T_BnP, keys_B, cfg_scale, steps=steps, sampler=sampler,
                       prediction=prediction, guided=guided, clip_x0=clip_x0)


def sample_codes(graphdef, params, cache, logits_XV, start_X, keys_B, cfg_scale, *, n: int, code_start: int,
                 code_end: int, guided: bool, patch_dim: int):
  """A discrete image (model.image_mode "discrete"): n code tokens after the cached prefix (ending with BOI).

  Each step samples (temperature 1) from the logits restricted to the code ids [code_start,
  code_end), guided as the continuous path is (uncond + cfg_scale * (cond - uncond) over the
  logits of the B conditional rows and, when guided, the B unconditional ones of `cache`),
  and feeds the token to both branches. Row b's draws come from keys_B[b] only.
  Returns codes [B, n] in [0, code_end - code_start).
  """
  B, V = keys_B.shape[0], logits_XV.shape[-1]
  X = logits_XV.shape[0]
  ids_V = jnp.arange(V)
  allowed_V = (ids_V >= code_start) & (ids_V < code_end)
  sample = jax.vmap(lambda l, k: sample_tokens(l[None], k, temperature=1.0)[0])

  def body(i, state):
    cache, logits_XV, codes_Bn, params = state
    logits_BV = diffusion.cfg_combine(logits_XV[:B], logits_XV[B:], cfg_scale) if guided else logits_XV
    tok_B = sample(jnp.where(allowed_V, logits_BV, -jnp.inf), jax.vmap(jax.random.fold_in, (0, None))(keys_B, i))
    codes_Bn = codes_Bn.at[:, i].set(tok_B - code_start)
    tok_X = jnp.concatenate([tok_B, tok_B]) if guided else tok_B
    batch = text_batch(tok_X[:, None], (start_X + i)[:, None], patch_dim)
    new_X1V, _, cache = forward(graphdef, params, batch, jnp.zeros((X, 1), jnp.float32), cache)
    return cache, new_X1V[:, 0], codes_Bn, params

  state = (cache, logits_XV, jnp.zeros((B, n), jnp.int32), params)
  return jax.lax.fori_loop(0, n, body, state)[2]


def denoise_recompute(graphdef, params, schedule, prefix, x_T_BnP, start_X, image_id, keys_B, cfg_scale,
                       *, steps: int, sampler: str, prediction: str, guided: bool, pad_id: int):
  """The reference path: every step runs the whole prefix plus the image with no cache."""
  Lp = prefix["tokens"].shape[1]

  def predict(params, x_XnP, t):
    image = image_batch(x_XnP, start_X, image_id, pad_id)
    batch = {k: jnp.concatenate([prefix[k], image[k]], axis=1) for k in image}
    t_XL = jnp.concatenate([jnp.zeros(prefix["tokens"].shape, jnp.float32),
                            jnp.full(x_XnP.shape[:2], t, jnp.float32)], axis=1)
    return forward(graphdef, params, batch, t_XL, None)[1][:, Lp:]

  return denoise_loop(predict, params, schedule, x_T_BnP, keys_B, cfg_scale, steps=steps, sampler=sampler,
                       prediction=prediction, guided=guided)


def commit_image(graphdef, params, cache, x0_BnP, start_B, image_id, eoi_id: int, pad_id: int, active_B=None):
  """Writes the finished image (t=0) and EOI into the cache; returns (logits after EOI, cache).

  With per-row cache lengths, `active_B` marks the rows that really made an image; the others
  write nothing visible and keep their length."""
  B, n, P = x0_BnP.shape
  image = image_batch(x0_BnP, start_B, image_id, pad_id)
  eoi = text_batch(jnp.full((B, 1), eoi_id, jnp.int32), (start_B + n)[:, None], P)
  batch = {k: jnp.concatenate([image[k], eoi[k]], axis=1) for k in image}
  if active_B is not None:
    batch["segment_ids"] = batch["segment_ids"] * active_B[:, None].astype(jnp.int32)
  old_length = cache.length
  logits_BLV, _, cache = forward(graphdef, params, batch, jnp.zeros((B, n + 1), jnp.float32), cache)
  return logits_BLV[:, -1], cache if active_B is None else _advance(cache, old_length, active_B, n + 1)


def prefill_rows(graphdef, params, batch, lengths_B, cache):
  """Writes right-padded prompts at slot 0 of a per-row cache; returns (logits at each row's last
  real position, cache whose lengths are the prompts')."""
  t_BL = jnp.zeros(batch["tokens"].shape, jnp.float32)
  logits_BLV, _, cache = forward(graphdef, params, batch, t_BL, cache)
  logits_BV = jnp.take_along_axis(logits_BLV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return logits_BV, dataclasses.replace(cache, length=lengths_B)


def decode_rows(graphdef, params, cache, logits_BV, keys_B, active_B, limit_B, banned_BV, stop_V, *,
                max_new: int, temperature: float, top_k: int, top_p: float, patch_dim: int, pad_id: int):
  """`decode` for a cache with per-row lengths, with nothing shared between rows: each row has its
  own PRNG stream (split only when it samples), limit and banned ids, writes at its own length
  and stops on its own, so a row's tokens do not depend on its batch-mates. Rows not `active_B`
  take no step. Returns (tokens_BT, tokens taken per row, cache, logits_BV, keys_B)."""
  B = logits_BV.shape[0]
  sample = jax.vmap(lambda l, k: sample_tokens(l[None], k, temperature=temperature, top_k=top_k, top_p=top_p)[0])

  def cond(state):
    i, _, _, done_B, _, _, _, _ = state
    return (i < max_new) & ~jnp.all(done_B)

  def body(state):
    i, cache, logits_BV, done_B, taken_B, tokens_BT, keys_B, params = state
    active = ~done_B
    split = jax.vmap(jax.random.split)(keys_B)
    keys_B = jnp.where(active[:, None], split[:, 0], keys_B)
    tok_B = sample(jnp.where(banned_BV, -jnp.inf, logits_BV), split[:, 1])
    tok_B = jnp.where(active, tok_B, pad_id)
    tokens_BT = tokens_BT.at[:, i].set(tok_B)
    batch = text_batch(tok_B[:, None], (cache.length)[:, None], patch_dim)
    batch["segment_ids"] = active[:, None].astype(jnp.int32)
    old_length = cache.length
    new_BV, _, cache = forward(graphdef, params, batch, jnp.zeros((B, 1), jnp.float32), cache)
    cache = _advance(cache, old_length, active, 1)
    logits_BV = jnp.where(active[:, None], new_BV[:, 0], logits_BV)
    taken_B = taken_B + active
    done_B = done_B | stop_V[tok_B] | (taken_B >= limit_B)
    return i + 1, cache, logits_BV, done_B, taken_B, tokens_BT, keys_B, params

  state = (jnp.int32(0), cache, logits_BV, ~active_B | (limit_B <= 0), jnp.zeros((B,), jnp.int32),
           jnp.full((B, max_new), pad_id, jnp.int32), keys_B, params)
  _, cache, logits_BV, _, taken_B, tokens_BT, keys_B, _ = jax.lax.while_loop(cond, body, state)
  return tokens_BT, taken_B, cache, logits_BV, keys_B


@functools.partial(jax.jit, static_argnames=("shape",))
def initial_noise(keys_B, shape: tuple[int, int]):
  """(x_T [B, *shape] standard normal, per-row keys for the sampler's later noise)."""
  init_keys, step_keys = jax.vmap(jax.random.split, out_axes=1)(keys_B)
  return jax.vmap(lambda k: jax.random.normal(k, shape))(init_keys), step_keys


@jax.jit
def stack_caches(a, b):
  """Rows of `a` then rows of `b` (same length and capacity)."""
  return shard_cache(dataclasses.replace(
      a, length=jnp.concatenate([a.length, b.length]) if a.length.ndim else a.length,
      k_NBSGK=jnp.concatenate([a.k_NBSGK, b.k_NBSGK], axis=1),
      v_NBSGK=jnp.concatenate([a.v_NBSGK, b.v_NBSGK], axis=1),
      segment_ids_BS=jnp.concatenate([a.segment_ids_BS, b.segment_ids_BS])))


def index_keys(seed: int, first_index: int, count: int):
  """One PRNG key per sample from (seed, global sample index): batching does not change a sample's noise."""
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(first_index, first_index + count))


def fold_keys(keys_B, k: int):
  """Each row's key folded with `k`: a second, third, ... independent draw for the same samples."""
  return jax.vmap(lambda key: jax.random.fold_in(key, k))(keys_B)


def log_probs(graphdef, params, batch):
  """log p(token[i+1] | tokens[..i]) and where both positions are real: ([B, L-1], [B, L-1])."""
  t_BL = jnp.zeros(batch["tokens"].shape, jnp.float32)
  logits_BLV, _, _ = forward(graphdef, params, batch, t_BL, None)
  logp_BL = losses.token_log_probs(logits_BLV[:, :-1], batch["tokens"][:, 1:])
  mask_BL = (batch["segment_ids"][:, :-1] != 0) & (batch["segment_ids"][:, 1:] != 0)
  return logp_BL, mask_BL
