"""The inference engine: KV-cached text decoding and image denoising against a cached prefix.

Text is decoded one token at a time against a KV cache (tfx/model/attention.py).
An image is `BOI, n patches, EOI`: after BOI the prefix's keys/values stay in
the cache and every denoising step runs only the image's n positions against
it, all steps inside one jitted `lax.fori_loop`. With guidance the
unconditional branch (an empty caption: `BOS BOI`) is cached too and batched
with the conditional one. Prompts in a batch are left-padded with segment 0,
which the attention mask ignores.
"""
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfx import diffusion, distributed, image_io, mesh as mesh_lib, patching, record

# ---- images in and out --------------------------------------------------------------------------


ImageReadError = image_io.ImageReadError  # a path that is not a readable image within the caps


def load_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] from a regular image file within image_io's byte and pixel caps;
  raises ImageReadError in one line."""
  return image_io.load_rgb(path)


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] -> uint8 (clipped)."""
  return np.asarray(np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255), np.uint8)


def image_grid(images_NHW3: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles N images into one uint8 grid with white gutters."""
  n, h, w, c = images_NHW3.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images_NHW3):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
  return grid


# ---- token sampling -----------------------------------------------------------------------------


def sample_tokens(logits_BV, rng, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """One token per row: greedy at temperature 0, else top-k / nucleus sampling."""
  if temperature <= 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # the smallest logit still inside the nucleus (the top token is always kept)
    keep_BV = mass_before_BV < top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


# ---- prompts as record fields (host side) -------------------------------------------------------

_PROMPT_FIELDS = ("tokens", "patches", "modality", "image_ids")
_BUCKET = 16  # prompt lengths are padded up to a multiple of this, so compiles are reused


def _bucket(length: int) -> int:
  return -(-length // _BUCKET) * _BUCKET


def concat_pieces(pieces: list[dict]) -> dict[str, np.ndarray]:
  """Joins example pieces (tfx.data.examples fields) and numbers their images 1..M in order."""
  out = {k: np.concatenate([p[k] for p in pieces]) for k in _PROMPT_FIELDS}
  image_ids, m, prev = np.zeros_like(out["image_ids"]), 0, 0
  for i, is_image in enumerate(out["modality"] == record.IMAGE):
    m += bool(is_image and not prev)
    image_ids[i] = m if is_image else 0
    prev = is_image
  out["image_ids"] = image_ids
  return out


def left_pad(prompts: list[dict], length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Stacks prompts right-aligned in [B, length] (segment 0 before them); returns (batch, lengths_B)."""
  B, P = len(prompts), prompts[0]["patches"].shape[-1]
  batch = {k: np.zeros((B, length) + ((P,) if k == "patches" else ()), record.FIELDS[k])
           for k in _PROMPT_FIELDS + ("segment_ids", "positions")}
  lengths_B = np.array([len(p["tokens"]) for p in prompts], np.int32)
  for b, (p, n) in enumerate(zip(prompts, lengths_B)):
    if n > length:
      raise ValueError(f"prompt of {n} positions does not fit in {length}")
    for k in _PROMPT_FIELDS:
      batch[k][b, length - n:] = p[k]
    batch["segment_ids"][b, length - n:] = 1
    batch["positions"][b, length - n:] = np.arange(n)
  return batch, lengths_B


# ---- pure functions that run the model (jitted by Generator) ------------------------------------


def _shard_cache(cache):
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


def _forward(graphdef, params, batch, t_BL, cache):
  logits_BLV, patch_out_BLP, cache = nnx.merge(graphdef, params)(batch, t_BL, cache=cache)
  return logits_BLV, patch_out_BLP, None if cache is None else _shard_cache(cache)


def _text_batch(tokens_BL, positions_BL, patch_dim: int):
  B, L = tokens_BL.shape
  ones = jnp.ones((B, L), jnp.int32)
  return dict(tokens=tokens_BL, patches=jnp.zeros((B, L, patch_dim), jnp.float32),
              modality=ones * record.TEXT, segment_ids=ones, positions=positions_BL,
              image_ids=jnp.zeros((B, L), jnp.int32))


def _image_batch(x_BnP, start_B, image_id, pad_id: int):
  B, n, _ = x_BnP.shape
  ones = jnp.ones((B, n), jnp.int32)
  return dict(tokens=ones * pad_id, patches=x_BnP, modality=ones * record.IMAGE, segment_ids=ones,
              positions=start_B[:, None] + jnp.arange(n, dtype=jnp.int32), image_ids=ones * image_id)


def _prefill(graphdef, params, batch, cache):
  """Writes a prompt chunk into the cache; returns (logits of its last position, cache)."""
  t_BL = jnp.zeros(batch["tokens"].shape, jnp.float32)
  logits_BLV, _, cache = _forward(graphdef, params, batch, t_BL, cache)
  return logits_BLV[:, -1], cache


def _decode(graphdef, params, cache, logits_BV, next_pos_B, rng, limit, banned_V, stop_V, *,
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
    batch = _text_batch(tok_B[:, None], (next_pos_B + i)[:, None], patch_dim)
    logits_B1V, _, cache = _forward(graphdef, params, batch, jnp.zeros((B, 1), jnp.float32), cache)
    return i + 1, cache, logits_B1V[:, 0], done_B, tokens_BT, rng, params

  # params ride in the loop state: NNX transforms inside the model (scan over layers) need the
  # module's arrays at the loop's own trace level
  state = (jnp.int32(0), cache, logits_BV, jnp.zeros((B,), bool), jnp.full((B, max_new), pad_id, jnp.int32),
           rng, params)
  steps, cache, logits_BV, _, tokens_BT, _, _ = jax.lax.while_loop(cond, body, state)
  return tokens_BT, steps, cache, logits_BV


def _denoise_loop(predict, params, schedule, x_T_BnP, keys_B, cfg_scale, *, steps: int, sampler: str,
                  prediction: str, guided: bool):
  """Runs `steps` sampler steps from pure noise; `predict(params, x_XnP, t)` gives [cond; uncond] outputs.

  params ride in the loop carry so that NNX transforms inside the model see them at the loop's level."""
  T = schedule.num_timesteps
  ts_np = diffusion.sample_timesteps(steps, T)
  ts, ts_prev = jnp.asarray(ts_np), jnp.asarray(diffusion.previous_timesteps(ts_np))
  B = x_T_BnP.shape[0]

  def body(i, state):
    x_BnP, params = state
    t, t_prev = ts[i], ts_prev[i]
    out_XnP = predict(params, jnp.concatenate([x_BnP, x_BnP]) if guided else x_BnP, t)
    out_BnP = diffusion.cfg_combine(out_XnP[:B], out_XnP[B:], cfg_scale) if guided else out_XnP
    if sampler == "ddim":
      return diffusion.ddim_step(schedule, x_BnP, t, t_prev, out_BnP, prediction), params
    noise_BnP = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x_BnP.shape[1:]))(keys_B)
    return diffusion.ddpm_step(schedule, x_BnP, t, t_prev, out_BnP, prediction, noise_BnP), params

  return jax.lax.fori_loop(0, steps, body, (x_T_BnP, params))[0]


def _denoise_cached(graphdef, params, schedule, cache, x_T_BnP, start_X, image_id, keys_B, cfg_scale, *,
                    steps: int, sampler: str, prediction: str, guided: bool, pad_id: int):
  """Denoises one image per row; each step runs only the n patches against the prefix `cache`.

  The cache (and `start_X`, each row's first patch position) holds the B
  conditional rows, then, when guided, the B unconditional ones.
  """
  def predict(params, x_XnP, t):
    batch = _image_batch(x_XnP, start_X, image_id, pad_id)
    t_XL = jnp.full(x_XnP.shape[:2], t, jnp.float32)
    return _forward(graphdef, params, batch, t_XL, cache)[1]

  return _denoise_loop(predict, params, schedule, x_T_BnP, keys_B, cfg_scale, steps=steps, sampler=sampler,
                       prediction=prediction, guided=guided)


def _denoise_recompute(graphdef, params, schedule, prefix, x_T_BnP, start_X, image_id, keys_B, cfg_scale,
                       *, steps: int, sampler: str, prediction: str, guided: bool, pad_id: int):
  """The reference path: every step runs the whole prefix plus the image with no cache."""
  Lp = prefix["tokens"].shape[1]

  def predict(params, x_XnP, t):
    image = _image_batch(x_XnP, start_X, image_id, pad_id)
    batch = {k: jnp.concatenate([prefix[k], image[k]], axis=1) for k in image}
    t_XL = jnp.concatenate([jnp.zeros(prefix["tokens"].shape, jnp.float32),
                            jnp.full(x_XnP.shape[:2], t, jnp.float32)], axis=1)
    return _forward(graphdef, params, batch, t_XL, None)[1][:, Lp:]

  return _denoise_loop(predict, params, schedule, x_T_BnP, keys_B, cfg_scale, steps=steps, sampler=sampler,
                       prediction=prediction, guided=guided)


def _commit_image(graphdef, params, cache, x0_BnP, start_B, image_id, eoi_id: int, pad_id: int):
  """Writes the finished image (t=0) and EOI into the cache; returns (logits after EOI, cache)."""
  B, n, P = x0_BnP.shape
  image = _image_batch(x0_BnP, start_B, image_id, pad_id)
  eoi = _text_batch(jnp.full((B, 1), eoi_id, jnp.int32), (start_B + n)[:, None], P)
  batch = {k: jnp.concatenate([image[k], eoi[k]], axis=1) for k in image}
  logits_BLV, _, cache = _forward(graphdef, params, batch, jnp.zeros((B, n + 1), jnp.float32), cache)
  return logits_BLV[:, -1], cache


@functools.partial(jax.jit, static_argnames=("shape",))
def _initial_noise(keys_B, shape: tuple[int, int]):
  """(x_T [B, *shape] standard normal, per-row keys for the sampler's later noise)."""
  init_keys, step_keys = jax.vmap(jax.random.split, out_axes=1)(keys_B)
  return jax.vmap(lambda k: jax.random.normal(k, shape))(init_keys), step_keys


@jax.jit
def _stack_caches(a, b):
  """Rows of `a` then rows of `b` (same length and capacity)."""
  return _shard_cache(dataclasses.replace(
      a, k_NBSGK=jnp.concatenate([a.k_NBSGK, b.k_NBSGK], axis=1),
      v_NBSGK=jnp.concatenate([a.v_NBSGK, b.v_NBSGK], axis=1),
      segment_ids_BS=jnp.concatenate([a.segment_ids_BS, b.segment_ids_BS])))


def _take_rows(cache, n: int):
  return dataclasses.replace(cache, k_NBSGK=cache.k_NBSGK[:, :n], v_NBSGK=cache.v_NBSGK[:, :n],
                             segment_ids_BS=cache.segment_ids_BS[:n])


# ---- the engine ---------------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _index_keys(seed: int, first_index: int, count: int):
  """One PRNG key per sample from (seed, global sample index): batching does not change a sample's noise."""
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(first_index, first_index + count))


class PromptTooLongError(ValueError):
  """A prompt longer than the model's context (config.seq_len positions)."""


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError in one line for sampling settings outside their ranges."""
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class Generator:
  """Text, images, captions and interleaved output from a trained model; compiles once per shape.

  Prompts are bounded as in training: a text-to-image caption is cut to
  data.max_caption_tokens, and any prompt longer than the model's context
  (seq_len positions) raises PromptTooLongError.
  """

  def __init__(self, config, model, *, tokenizer=None, autoencoder=None):
    from tfx import autoencoder as autoencoder_lib
    from tfx.data import tokenizer as tokenizer_lib
    self.config = config
    self.tokenizer = tok = tokenizer or tokenizer_lib.load(config)
    self.autoencoder = autoencoder or autoencoder_lib.load(config)
    self.patch_size, self.channels = config.image.patch_size, config.autoencoder.latent_channels
    self.patch_dim = patching.patch_dim(self.patch_size, self.channels)
    self.num_patches = patching.num_patches(config.image.resolution // config.autoencoder.downsample,
                                            self.patch_size)
    self.schedule = diffusion.make_schedule(config.diffusion)
    self.prediction = config.diffusion.prediction
    self.graphdef, self.params = nnx.split(model)
    vocab = tokenizer_lib.model_vocab_size(config, tok)  # raises if smaller than tok needs
    unusable = np.arange(vocab) >= tok.vocab_size
    self._text_only = self._ids_mask(unusable, tok.pad_id, tok.bos_id, tok.boi_id, tok.eoi_id)
    self._text_or_image = self._ids_mask(unusable, tok.pad_id, tok.bos_id, tok.eoi_id)
    self._eos = self._ids_mask(np.zeros(vocab, bool), tok.eos_id)
    self._eos_or_boi = self._ids_mask(np.zeros(vocab, bool), tok.eos_id, tok.boi_id)
    g, pad = self.graphdef, tok.pad_id
    self._prefill = jax.jit(functools.partial(_prefill, g))
    self._decode = jax.jit(functools.partial(_decode, g, patch_dim=self.patch_dim, pad_id=pad),
                           static_argnames=("max_new", "temperature", "top_k", "top_p"))
    statics = ("steps", "sampler", "prediction", "guided", "pad_id")
    self._denoise = jax.jit(functools.partial(_denoise_cached, g), static_argnames=statics)
    self._denoise_recompute = jax.jit(functools.partial(_denoise_recompute, g), static_argnames=statics)
    self._commit = jax.jit(functools.partial(_commit_image, g, eoi_id=tok.eoi_id, pad_id=pad))
    self._log_probs = jax.jit(functools.partial(_log_probs, g))
    # made inside jit so that, on a mesh, each device only ever holds its shard
    self._init_cache = jax.jit(lambda batch, max_len: _shard_cache(model.init_cache(batch, max_len)),
                               static_argnums=(0, 1))

  def load_params(self, model) -> None:
    """Samples with `model`'s weights from now on (same architecture: compiled programs are reused)."""
    graphdef, params = nnx.split(model)
    if graphdef != self.graphdef:
      raise ValueError("load_params needs a model of the same architecture as the Generator's")
    self.params = params

  @staticmethod
  def _ids_mask(base: np.ndarray, *ids: int) -> jax.Array:
    mask = base.copy()
    mask[list(ids)] = True
    return jnp.asarray(mask)

  # -- sequence pieces --

  def text_piece(self, text: str, *, bos: bool) -> dict:
    from tfx.data import examples
    return examples.text_example(self.tokenizer.encode(text), self.tokenizer, self.patch_dim, bos=bos, eos=False)

  def image_piece(self, patches_nP: np.ndarray, *, bos: bool) -> dict:
    """`[BOS] BOI patches EOI` (an image with no caption, as image-first training data starts)."""
    from tfx.data import examples
    return examples.image_text_example([], patches_nP, self.tokenizer, caption_first=False, bos=bos, eos=False)

  def caption_ids(self, text: str) -> list[int]:
    """A caption's token ids, cut to data.max_caption_tokens as the training pipeline cuts them."""
    return list(self.tokenizer.encode(text))[:self.config.data.max_caption_tokens]

  def image_start_piece(self, caption_ids, *, bos: bool) -> dict:
    """`[BOS] caption BOI`: a prompt that asks for an image next (caption dropout's empty caption when [])."""
    from tfx.data import examples
    return examples.image_text_example(caption_ids, np.zeros((0, self.patch_dim), np.float32), self.tokenizer,
                                       bos=bos, image_last=True)

  def image_patches(self, images) -> np.ndarray:
    """Images (uint8 [H, W, 3] of any size, or PNG/JPEG paths) -> patches [N, n, P] in diffusion units."""
    from tfx.data import pipeline
    arrays = [load_image(img) if isinstance(img, (str, os.PathLike)) else np.asarray(img) for img in images]
    for img in arrays:
      if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ImageReadError(f"an image must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    pixels_NRR3 = np.stack([pipeline.pixels_to_model(img, self.config.image.resolution) for img in arrays])
    if self.config.autoencoder.kind == "pixels":
      grid = pixels_NRR3  # the data pipeline feeds raw pixels, unscaled
    else:
      grid = self.autoencoder.to_diffusion(self.autoencoder.encode(pixels_NRR3))
    return np.asarray(patching.patchify(np.asarray(grid, np.float32), self.patch_size))

  def patches_to_images(self, x0_BnP) -> np.ndarray:
    """Generated patches [B, n, P] -> uint8 images [B, H, W, 3]."""
    # rows split over several processes are gathered first: every process returns all the images
    grid = patching.unpatchify(jnp.asarray(distributed.addressable(x0_BnP)), self.patch_size, self.channels)
    if self.config.autoencoder.kind != "pixels":
      grid = self.autoencoder.decode(self.autoencoder.from_diffusion(grid))
    return to_uint8(grid)

  # -- building blocks --

  def _empty_cache(self, batch: int, capacity: int):
    return self._init_cache(batch, _round_up(capacity, 64))

  def _unconditional_cache(self, batch: int, capacity: int, length: int):
    """The empty-caption prefix `BOS BOI`, cached so that it ends at `length` like the conditional one."""
    piece = self.image_start_piece([], bos=True)
    cache = self._empty_cache(batch, capacity)
    cache = dataclasses.replace(cache, length=jnp.int32(length - len(piece["tokens"])))
    ubatch, lengths = left_pad([piece] * batch, len(piece["tokens"]))
    return self._prefill(self.params, ubatch, cache)[1], lengths

  def _sampling_args(self, steps, cfg_scale, sampler):
    d = self.config.diffusion
    steps = d.sample_steps if steps is None else int(steps)
    cfg_scale = d.cfg_scale if cfg_scale is None else float(cfg_scale)
    sampler = d.sampler if sampler is None else sampler
    if not cfg_scale >= 0:
      raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if sampler not in ("ddim", "ddpm"):
      raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    diffusion.sample_timesteps(steps, d.num_timesteps)  # validates the step count
    return steps, cfg_scale, sampler

  def denoise_image(self, cache, start_B, length: int, image_id: int, keys_B, *, steps=None, cfg_scale=None,
                    sampler=None) -> jax.Array:
    """Patches [B, n, P] of a new image after the cached prefix (which ends with BOI at `length` - 1)."""
    steps, cfg_scale, sampler = self._sampling_args(steps, cfg_scale, sampler)
    B = start_B.shape[0]
    guided = cfg_scale != 1.0
    if guided:
      ucache, ulengths = self._unconditional_cache(B, cache.max_len, length)
      cache = _stack_caches(cache, ucache)
      start_B = np.concatenate([start_B, ulengths])
    x_T_BnP, step_keys = _initial_noise(keys_B, (self.num_patches, self.patch_dim))
    return self._denoise(self.params, self.schedule, cache, x_T_BnP, jnp.asarray(start_B, jnp.int32),
                         jnp.int32(image_id), step_keys, jnp.float32(cfg_scale), steps=steps, sampler=sampler,
                         prediction=self.prediction, guided=guided, pad_id=self.tokenizer.pad_id)

  def _prefill_prompts(self, prompts: list[dict], extra: int):
    """Left-pads and caches prompts; returns (logits of each last position, cache, lengths_B, padded length)."""
    longest = max(len(p["tokens"]) for p in prompts)
    if longest > self.config.seq_len:
      raise PromptTooLongError(f"a prompt of {longest} positions is longer than the model's context "
                               f"(seq_len {self.config.seq_len}); shorten it")
    images = max(int(p["image_ids"].max(initial=0)) for p in prompts)
    if self.config.model.encoder == "unet" and images > self.config.image.max_images_per_seq:
      raise ValueError(f"a prompt holds {images} images but the U-Net has "
                       f"image.max_images_per_seq={self.config.image.max_images_per_seq} slots per row")
    Lp = _bucket(max(len(p["tokens"]) for p in prompts))
    batch, lengths_B = left_pad(prompts, Lp)
    logits_BV, cache = self._prefill(self.params, batch, self._empty_cache(len(prompts), Lp + extra))
    return logits_BV, cache, lengths_B, Lp

  def _decode_text(self, cache, logits_BV, next_pos_B, rng, *, limit: int, max_new: int, banned, stop,
                   temperature: float, top_k: int, top_p: float):
    tokens_BT, steps, cache, logits_BV = self._decode(
        self.params, cache, logits_BV, jnp.asarray(next_pos_B, jnp.int32), rng, jnp.int32(limit), banned,
        stop, max_new=max_new, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    return np.asarray(distributed.addressable(tokens_BT)), int(steps), cache, logits_BV

  def _text_until(self, ids) -> str:
    ids = list(ids)
    stops = [i for i, t in enumerate(ids) if t in (self.tokenizer.eos_id, self.tokenizer.boi_id)]
    return self.tokenizer.decode(ids[:stops[0]] if stops else ids)

  # -- public API --

  def _in_batches(self, items: list, batch_size: int, run, progress=None) -> list:
    """`run(chunk, first)` on chunks of `batch_size`; with several chunks the last is padded (by
    repeating its last item) so every chunk reuses one compiled shape. Returns the real rows' results."""
    if not items:
      raise ValueError("nothing to generate: the list of prompts or images is empty")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results = []
    for first in range(0, len(items), batch_size):
      chunk = list(items[first:first + batch_size])
      real = len(chunk)
      if len(items) > batch_size:
        chunk += chunk[-1:] * (batch_size - real)
      results.extend(list(run(chunk, first))[:real])
      if progress is not None:
        progress(first + real, len(items))
    return results

  def text_to_image(self, prompts: list[str], *, seed: int = 0, first_index: int = 0, steps=None,
                    cfg_scale=None, sampler=None, batch_size: int = 16, progress=None) -> np.ndarray:
    """uint8 [N, H, W, 3], one image per caption; sample i's noise comes from (seed, first_index + i).

    steps / cfg_scale / sampler default to config.diffusion; cfg_scale 1 runs no unconditional
    branch. `progress(done, total)` is called after each batch."""
    steps, cfg_scale, sampler = self._sampling_args(steps, cfg_scale, sampler)

    def run(chunk, first):
      pieces = [self.image_start_piece(self.caption_ids(p), bos=True) for p in chunk]
      _, cache, lengths_B, Lp = self._prefill_prompts(pieces, self.num_patches)
      keys_B = _index_keys(seed, first_index + first, len(chunk))
      x0_BnP = self.denoise_image(cache, lengths_B, Lp, 1, keys_B, steps=steps, cfg_scale=cfg_scale,
                                  sampler=sampler)
      return self.patches_to_images(x0_BnP)

    return np.stack(self._in_batches(list(prompts), batch_size, run, progress))

  def caption(self, images, *, seed: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
              max_tokens: int = 32, batch_size: int = 16, progress=None) -> list[str]:
    """One caption per image (uint8 [H, W, 3] of any size, or a path): `BOS BOI patches EOI`, then text."""
    check_sampling(temperature, top_k, top_p)
    def run(chunk, first):
      pieces = [self.image_piece(p, bos=True) for p in self.image_patches(chunk)]
      return self._continue(pieces, jax.random.fold_in(jax.random.PRNGKey(seed), first), temperature, top_k,
                            top_p, max_tokens)
    return self._in_batches(list(images), batch_size, run, progress)

  def complete(self, prompts: list[str], *, seed: int = 0, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, max_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Text continuations of text prompts (no images), to EOS or `max_tokens`."""
    check_sampling(temperature, top_k, top_p)
    def run(chunk, first):
      return self._continue([self.text_piece(p, bos=True) for p in chunk],
                            jax.random.fold_in(jax.random.PRNGKey(seed), first), temperature, top_k, top_p,
                            max_tokens)
    return self._in_batches(list(prompts), batch_size, run)

  def _continue(self, pieces, rng, temperature, top_k, top_p, max_tokens) -> list[str]:
    logits_BV, cache, lengths_B, _ = self._prefill_prompts(pieces, max_tokens)
    tokens_BT, _, _, _ = self._decode_text(
        cache, logits_BV, lengths_B, rng, limit=max_tokens, max_new=max_tokens,
        banned=self._text_only, stop=self._eos, temperature=temperature, top_k=top_k, top_p=top_p)
    return [self._text_until(row) for row in tokens_BT]

  def generate(self, prompt: list, *, seed: int = 0, max_tokens: int = 64, max_images: int = 1,
               image_next: bool = False, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               steps=None, cfg_scale=None, sampler=None) -> list:
    """Continues one interleaved prompt: text (str) and images (uint8 [H, W, 3]), any order.

    Text is decoded until EOS or `max_tokens`; each BOI it produces (or that
    `image_next` forces) is followed by a denoised image, up to `max_images`.
    Returns the new segments in order: str for text, uint8 [H, W, 3] for images.
    """
    check_sampling(temperature, top_k, top_p)
    pieces = []
    for item in prompt:
      if isinstance(item, str):
        if item:
          pieces.append(self.text_piece(item, bos=not pieces))
      else:
        pieces.append(self.image_piece(self.image_patches([item])[0], bos=not pieces))
    if not pieces:
      raise ValueError("the prompt is empty: give at least one non-empty text or an image")
    if image_next and max_images < 1:
      raise ValueError("image_next needs max_images >= 1")
    if image_next:
      pieces.append(self.image_start_piece([], bos=False))
    prompt_fields = concat_pieces(pieces)
    n, tok = self.num_patches, self.tokenizer
    images_so_far = int(prompt_fields["image_ids"].max())
    logits_BV, cache, lengths_B, length = self._prefill_prompts(
        [prompt_fields], max_tokens + max_images * (n + 1))
    pos, last, rng = int(lengths_B[0]), int(prompt_fields["tokens"][-1]), jax.random.PRNGKey(seed)
    out, made, tokens_left = [], 0, max_tokens
    while True:
      if last == tok.boi_id and made < max_images:
        rng, key = jax.random.split(rng)
        image_id = images_so_far + made + 1
        x0_BnP = self.denoise_image(cache, np.array([pos], np.int32), length, image_id, key[None],
                                    steps=steps, cfg_scale=cfg_scale, sampler=sampler)
        logits_BV, cache = self._commit(self.params, cache, x0_BnP, jnp.array([pos], jnp.int32),
                                        jnp.int32(image_id))
        out.append(self.patches_to_images(x0_BnP)[0])
        made, pos, length, last = made + 1, pos + n + 1, length + n + 1, tok.eoi_id
        continue
      if tokens_left <= 0 or last == tok.eos_id:
        break
      rng, key = jax.random.split(rng)
      banned = self._text_or_image if made < max_images else self._text_only
      tokens_BT, taken, cache, logits_BV = self._decode_text(
          cache, logits_BV, [pos], key, limit=tokens_left, max_new=max_tokens, banned=banned,
          stop=self._eos_or_boi, temperature=temperature, top_k=top_k, top_p=top_p)
      ids = tokens_BT[0, :taken]
      text = self._text_until(ids)
      if text:
        out.append(text)
      tokens_left, pos, length = tokens_left - taken, pos + taken, length + taken
      if taken == 0:
        break
      last = int(ids[-1])
    return out

  def log_likelihood(self, texts: list[str], *, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log p over `text EOS` given BOS, number of predicted tokens) per text."""
    from tfx.data import examples

    def run(chunk, first):
      pieces = [examples.text_example(self.tokenizer.encode(t), self.tokenizer, self.patch_dim) for t in chunk]
      batch, _ = left_pad(pieces, _bucket(max(len(p["tokens"]) for p in pieces)))
      logp_BL, mask_BL = self._log_probs(self.params, batch)
      logp_BL = np.asarray(distributed.addressable(logp_BL), np.float64)
      mask_BL = np.asarray(distributed.addressable(mask_BL))
      return list(zip((logp_BL * mask_BL).sum(-1), mask_BL.sum(-1)))

    rows = self._in_batches(list(texts), batch_size, run)
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows], np.int64)


def _log_probs(graphdef, params, batch):
  """log p(token[i+1] | tokens[..i]) and where both positions are real: ([B, L-1], [B, L-1])."""
  t_BL = jnp.zeros(batch["tokens"].shape, jnp.float32)
  logits_BLV, _, _ = _forward(graphdef, params, batch, t_BL, None)
  logp_BLV = jax.nn.log_softmax(logits_BLV[:, :-1], axis=-1)
  targets_BL = batch["tokens"][:, 1:]
  logp_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
  mask_BL = (batch["segment_ids"][:, :-1] != 0) & (batch["segment_ids"][:, 1:] != 0)
  return logp_BL, mask_BL
