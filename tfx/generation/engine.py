"""The Generator: text, images, captions and interleaved documents from a trained model.

Text is decoded one token at a time against a KV cache (tfx/model/attention.py).
An image is `BOI, n patches, EOI`: after BOI the prefix's keys/values stay in
the cache and every denoising step runs only the image's n positions against
it (tfx/generation/kernels.py). With guidance the unconditional branch (an
empty caption: `BOS BOI`, what caption dropout trains) is cached too and
batched with the conditional one. In model.image_mode "discrete" (tfx/image_codes.py)
an image is h*w VQ code tokens instead: sampled one at a time after BOI, restricted to
the code ids, with guidance on the logits, then decoded by the VQ tokenizer.
"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfx import diffusion, distributed, image_codes, patching
from tfx.generation import kernels
from tfx.generation.images import ImageReadError, load_image, to_uint8
from tfx.generation.prompts import bucket, concat_pieces, left_pad, right_pad
from tfx.generation.sampling import check_sampling


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


class PromptTooLongError(ValueError):
  """A prompt longer than the model's context (config.seq_len positions)."""


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
    text_vocab = tokenizer_lib.model_vocab_size(config, tok)  # raises if smaller than tok needs
    self.discrete = image_codes.is_discrete(config)
    vocab = text_vocab + (config.autoencoder.codebook_size if self.discrete else 0)
    self.code_start, self.code_end = text_vocab, vocab   # code ids (empty unless discrete)
    if self.discrete:
      self.num_patches = image_codes.codes_per_image(config)
    unusable = np.arange(vocab) >= tok.vocab_size   # codes included: text never samples them
    self._text_only = self._ids_mask(unusable, tok.pad_id, tok.bos_id, tok.boi_id, tok.eoi_id)
    self._text_or_image = self._ids_mask(unusable, tok.pad_id, tok.bos_id, tok.eoi_id)
    self._eos = self._ids_mask(np.zeros(vocab, bool), tok.eos_id)
    self._eos_or_boi = self._ids_mask(np.zeros(vocab, bool), tok.eos_id, tok.boi_id)
    g, pad = self.graphdef, tok.pad_id
    self._prefill = jax.jit(functools.partial(kernels.prefill, g))
    self._decode = jax.jit(functools.partial(kernels.decode, g, patch_dim=self.patch_dim, pad_id=pad),
                           static_argnames=("max_new", "temperature", "top_k", "top_p"))
    statics = ("steps", "sampler", "prediction", "guided", "pad_id")
    self._denoise = jax.jit(functools.partial(kernels.denoise_cached, g),
                            static_argnames=statics + ("read_only", "clip_x0"))
    self._denoise_recompute = jax.jit(functools.partial(kernels.denoise_recompute, g), static_argnames=statics)
    self._sample_codes = jax.jit(functools.partial(kernels.sample_codes, g, patch_dim=self.patch_dim),
                                 static_argnames=("n", "code_start", "code_end", "guided"))
    self._commit = jax.jit(functools.partial(kernels.commit_image, g, eoi_id=tok.eoi_id, pad_id=pad))
    self._prefill_rows = jax.jit(functools.partial(kernels.prefill_rows, g))
    self._decode_rows = jax.jit(functools.partial(kernels.decode_rows, g, patch_dim=self.patch_dim, pad_id=pad),
                                static_argnames=("max_new", "temperature", "top_k", "top_p"))
    self._log_probs = jax.jit(functools.partial(kernels.log_probs, g))
    # made inside jit so that, on a mesh, each device only ever holds its shard
    self._init_cache = jax.jit(lambda batch, max_len: kernels.shard_cache(model.init_cache(batch, max_len)),
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
    """`[BOS] BOI patches EOI` (an image with no caption, as image-first training data starts);
    discrete: `patches_nP` are the image's n codes."""
    from tfx.data import examples
    if self.discrete:
      return examples.code_image_text_example([], np.asarray(patches_nP) + self.code_start, self.tokenizer,
                                              self.patch_dim, caption_first=False, bos=bos, eos=False)
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
    """Images (uint8 [H, W, 3] of any size, or PNG/JPEG paths) -> patches [N, n, P] in diffusion units
    (discrete: VQ codes [N, n])."""
    from tfx.data import pipeline
    arrays = [load_image(img) if isinstance(img, (str, os.PathLike)) else np.asarray(img) for img in images]
    for img in arrays:
      if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ImageReadError(f"an image must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    pixels_NRR3 = np.stack([pipeline.pixels_to_model(img, self.config.image.resolution) for img in arrays])
    if self.discrete:
      return np.asarray(self.autoencoder.encode(pixels_NRR3)).reshape(len(arrays), -1)
    if self.config.autoencoder.kind == "pixels":
      grid = pixels_NRR3  # the data pipeline feeds raw pixels, unscaled
    else:
      grid = self.autoencoder.to_diffusion(self.autoencoder.encode(pixels_NRR3))
    return np.asarray(patching.patchify(np.asarray(grid, np.float32), self.patch_size))

  def patches_to_images(self, x0_BnP) -> np.ndarray:
    """Generated patches [B, n, P] (discrete: codes [B, n]) -> uint8 images [B, H, W, 3]."""
    # rows split over several processes are gathered first: every process returns all the images
    if self.discrete:
      codes_Bn = np.asarray(distributed.addressable(x0_BnP))
      side = int(round(self.num_patches ** 0.5))
      return to_uint8(self.autoencoder.decode(codes_Bn.reshape(-1, side, side)))
    grid = patching.unpatchify(jnp.asarray(distributed.addressable(x0_BnP)), self.patch_size, self.channels)
    if self.config.autoencoder.kind != "pixels":
      grid = self.autoencoder.decode(self.autoencoder.from_diffusion(grid))
    return to_uint8(grid)

  # -- building blocks --

  def _empty_cache(self, batch: int, capacity: int):
    return self._init_cache(batch, _round_up(capacity, 64))

  def _unconditional_cache(self, batch: int, capacity: int, length: int):
    """The empty-caption prefix `BOS BOI`, cached so that it ends at `length` like the conditional one;
    returns (cache, lengths, logits after BOI)."""
    piece = self.image_start_piece([], bos=True)
    cache = self._empty_cache(batch, capacity)
    cache = dataclasses.replace(cache, length=jnp.int32(length - len(piece["tokens"])))
    ubatch, lengths = left_pad([piece] * batch, len(piece["tokens"]))
    logits_BV, cache = self._prefill(self.params, ubatch, cache)
    return cache, lengths, logits_BV

  def _sampling_args(self, steps, cfg_scale, sampler, cfg_interval, clip_x0):
    d = self.config.diffusion
    steps = d.sample_steps if steps is None else int(steps)
    cfg_scale = d.cfg_scale if cfg_scale is None else float(cfg_scale)
    sampler = d.sampler if sampler is None else sampler
    cfg_interval = diffusion.check_cfg_interval(d.cfg_interval if cfg_interval is None else cfg_interval)
    clip_x0 = diffusion.check_clip_x0(d.clip_x0 if clip_x0 is None else clip_x0)
    if not cfg_scale >= 0:
      raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if sampler not in ("ddim", "ddpm"):
      raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if self.discrete and cfg_interval != (0.0, 1.0):
      raise ValueError(f"diffusion.cfg_interval {cfg_interval} limits guidance to diffusion timesteps, which "
                       "discrete images (model.image_mode='discrete') do not have; leave it (0, 1)")
    if self.discrete and clip_x0:
      raise ValueError(f"diffusion.clip_x0 {clip_x0} clips a predicted x0, which discrete images "
                       "(model.image_mode='discrete') do not have; leave it 0")
    diffusion.sample_timesteps(steps, d.num_timesteps)  # validates the step count
    return steps, cfg_scale, sampler, cfg_interval, clip_x0

  def _step_scales(self, steps: int, cfg_scale: float, cfg_interval) -> jax.Array:
    """The guidance scale of each denoising step (1 outside cfg_interval)."""
    T = self.config.diffusion.num_timesteps
    return jnp.asarray(diffusion.guidance_scales(diffusion.sample_timesteps(steps, T), cfg_scale, cfg_interval, T))

  def denoise_image(self, cache, start_B, length: int, image_id: int, keys_B, *, steps=None, cfg_scale=None,
                    sampler=None, cfg_interval=None, clip_x0=None, logits_BV=None) -> jax.Array:
    """Patches [B, n, P] of a new image after the cached prefix (which ends with BOI at `length` - 1).

    Discrete (model.image_mode): codes [B, n] sampled after BOI from `logits_BV`, the prefix's last
    logits (steps, sampler, cfg_interval and clip_x0 do not apply)."""
    steps, cfg_scale, sampler, cfg_interval, clip_x0 = self._sampling_args(steps, cfg_scale, sampler,
                                                                            cfg_interval, clip_x0)
    B = start_B.shape[0]
    guided = cfg_scale != 1.0
    if guided:
      ucache, ulengths, ulogits_BV = self._unconditional_cache(B, cache.max_len, length)
      cache = kernels.stack_caches(cache, ucache)
      start_B = np.concatenate([start_B, ulengths])
      if self.discrete:
        logits_BV = jnp.concatenate([logits_BV, ulogits_BV])
    if self.discrete:
      return self._sample_codes(self.params, cache, logits_BV, jnp.asarray(start_B, jnp.int32), keys_B,
                                jnp.float32(cfg_scale), n=self.num_patches, code_start=self.code_start,
                                code_end=self.code_end, guided=guided)
    x_T_BnP, step_keys = kernels.initial_noise(keys_B, (self.num_patches, self.patch_dim))
    return self._denoise(self.params, self.schedule, cache, x_T_BnP, jnp.asarray(start_B, jnp.int32),
                         jnp.int32(image_id), step_keys, self._step_scales(steps, cfg_scale, cfg_interval),
                         steps=steps, sampler=sampler,
                         prediction=self.prediction, guided=guided, pad_id=self.tokenizer.pad_id,
                         read_only=bool(self.config.diffusion.read_only_cache), clip_x0=clip_x0)

  def _prefill_prompts(self, prompts: list[dict], extra: int):
    """Left-pads and caches prompts; returns (logits of each last position, cache, lengths_B, padded length)."""
    self._check_length(prompts)
    images = max(int(p["image_ids"].max(initial=0)) for p in prompts)
    if self.config.model.encoder == "unet" and images > self.config.image.max_images_per_seq:
      raise ValueError(f"a prompt holds {images} images but the U-Net has "
                       f"image.max_images_per_seq={self.config.image.max_images_per_seq} slots per row")
    Lp = bucket(max(len(p["tokens"]) for p in prompts))
    batch, lengths_B = left_pad(prompts, Lp)
    logits_BV, cache = self._prefill(self.params, batch, self._empty_cache(len(prompts), Lp + extra))
    return logits_BV, cache, lengths_B, Lp

  def _check_length(self, prompts: list[dict]) -> None:
    longest = max(len(p["tokens"]) for p in prompts)
    if longest > self.config.seq_len:
      raise PromptTooLongError(f"a prompt of {longest} positions is longer than the model's context "
                               f"(seq_len {self.config.seq_len}); shorten it")

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
                    cfg_scale=None, sampler=None, cfg_interval=None, clip_x0=None, best_of=None,
                    batch_size: int = 16, progress=None) -> np.ndarray:
    """uint8 [N, H, W, 3], one image per caption; sample i's noise comes from (seed, first_index + i).

    steps / cfg_scale / sampler / cfg_interval / clip_x0 / best_of default to config.diffusion;
    cfg_scale 1 runs no unconditional branch. best_of K > 1 draws K images per caption (the first
    with the noise of K = 1, the others from that key folded with 1..K-1) and returns the one with
    the highest `caption_log_likelihood`. `progress(done, total)` is called after each batch."""
    steps, cfg_scale, sampler, cfg_interval, clip_x0 = self._sampling_args(steps, cfg_scale, sampler,
                                                                            cfg_interval, clip_x0)
    best_of = diffusion.check_best_of(self.config.diffusion.best_of if best_of is None else best_of)

    def run(chunk, first):
      pieces = [self.image_start_piece(self.caption_ids(p), bos=True) for p in chunk]
      logits_BV, cache, lengths_B, Lp = self._prefill_prompts(pieces, self.num_patches)
      keys_B = kernels.index_keys(seed, first_index + first, len(chunk))
      images_KBHWC = np.stack([
          self.patches_to_images(self.denoise_image(
              cache, lengths_B, Lp, 1, keys_B if k == 0 else kernels.fold_keys(keys_B, k), steps=steps,
              cfg_scale=cfg_scale, sampler=sampler, cfg_interval=cfg_interval, clip_x0=clip_x0,
              logits_BV=logits_BV))
          for k in range(best_of)])
      if best_of == 1:
        return images_KBHWC[0]
      B = len(chunk)
      log_p_KB = self.caption_log_likelihood(list(images_KBHWC.reshape(best_of * B, *images_KBHWC.shape[2:])),
                                             list(chunk) * best_of, batch_size=B).reshape(best_of, B)
      return images_KBHWC[log_p_KB.argmax(0), np.arange(B)]

    return np.stack(self._in_batches(list(prompts), batch_size, run, progress))

  def caption_log_likelihood(self, images, captions: list[str], *, batch_size: int = 16) -> np.ndarray:
    """log p(caption EOS | BOS BOI image EOI) per (image, caption) pair, summed over the caption's
    tokens (cut as `caption_ids` cuts them): how well the model reads each image as its caption,
    in the image-first layout that training's captioning pairs use. float64 [N]."""
    from tfx.data import examples
    if len(images) != len(captions):
      raise ValueError(f"{len(images)} images but {len(captions)} captions")
    tok = self.tokenizer

    def run(chunk, first):
      imgs, texts = zip(*chunk)
      pieces = [concat_pieces([self.image_piece(patches, bos=True),
                               examples.text_example(self.caption_ids(text), tok, self.patch_dim, bos=False)])
                for patches, text in zip(self.image_patches(list(imgs)), texts)]
      self._check_length(pieces)
      batch, _ = left_pad(pieces, bucket(max(len(p["tokens"]) for p in pieces)))
      logp_BL, mask_BL = (np.asarray(distributed.addressable(a)) for a in self._log_probs(self.params, batch))
      # the targets after the image's EOI: the caption's tokens and EOS
      eoi_B = (batch["tokens"] == tok.eoi_id).argmax(1)
      caption_BL = np.arange(1, batch["tokens"].shape[1])[None] > eoi_B[:, None]
      return (logp_BL.astype(np.float64) * (mask_BL & caption_BL)).sum(-1)

    return np.array(self._in_batches(list(zip(images, captions)), batch_size, run))

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

  def generate(self, prompt: list, **kwargs) -> list:
    """Continues one interleaved prompt (see `generate_batch`, which this is with one row)."""
    return self.generate_batch([prompt], **kwargs)[0]

  def _interleaved_fields(self, prompt: list, image_next: bool) -> dict[str, np.ndarray]:
    """A prompt of text and images (items as `generate_batch` takes them) as record fields."""
    pieces = []
    for item in prompt:
      if isinstance(item, dict):
        if len(item) != 1 or not {"text", "image"} >= set(item):
          raise ValueError(f'a prompt piece is {{"text": ...}} or {{"image": ...}}, got keys {sorted(item)}')
        if not isinstance(item.get("text", ""), str):
          raise ValueError(f"a text piece must be a string, got {type(item['text']).__name__}")
        item = item["text"] if "text" in item else [item["image"]]
      if isinstance(item, str):
        if item:
          pieces.append(self.text_piece(item, bos=not pieces))
      else:  # an image array, or a one-item list holding an {"image": ...} value
        pieces.append(self.image_piece(self.image_patches(item if isinstance(item, list) else [item])[0],
                                       bos=not pieces))
    if not pieces:
      raise ValueError("the prompt is empty: give at least one non-empty text or an image")
    if image_next:
      pieces.append(self.image_start_piece([], bos=False))
    return concat_pieces(pieces)

  def generate_batch(self, prompts: list[list], *, seed: int = 0, first_index: int = 0, max_tokens: int = 64,
                     max_images: int = 1, image_next: bool = False, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, steps=None, cfg_scale=None, sampler=None, cfg_interval=None,
                     clip_x0=None, batch_size: int = 16) -> list:
    """Continues interleaved prompts of text and images in any order, `batch_size` per compiled call.

    Items are str or {"text": str} for text, uint8 [H, W, 3] or {"image": array or
    PNG/JPEG path} for images. Text is decoded until EOS or `max_tokens`; each BOI
    it produces (or that `image_next` forces) is followed by an image denoised
    against the whole cached context (guidance's other branch is the empty caption
    `BOS BOI`, what caption dropout trains), committed to the cache, and decoding
    goes on, up to `max_images` images. Every row has its own cache length and
    PRNG stream (seed, first_index + i), so a row's output does not depend on its
    batch-mates. Returns per prompt the new segments in order: str for text,
    uint8 [H, W, 3] for images.
    """
    steps, cfg_scale, sampler, cfg_interval, clip_x0 = self._sampling_args(steps, cfg_scale, sampler,
                                                                            cfg_interval, clip_x0)
    check_sampling(temperature, top_k, top_p)
    if self.discrete:
      raise ValueError("interleaved generation is not implemented for model.image_mode='discrete'; "
                       "text_to_image, caption and complete are")
    if image_next and max_images < 1:
      raise ValueError("image_next needs max_images >= 1")
    fields = [self._interleaved_fields(p, image_next) for p in prompts] if prompts else []

    def run(chunk, first):
      return self._generate_rows(chunk, kernels.index_keys(seed, first_index + first, len(chunk)),
                                 max_tokens=max_tokens, max_images=max_images, temperature=temperature,
                                 top_k=top_k, top_p=top_p, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                                 cfg_interval=cfg_interval, clip_x0=clip_x0)
    return self._in_batches(fields, batch_size, run)

  def _row_cache(self, batch: int, capacity: int):
    cache = self._empty_cache(batch, capacity)
    return dataclasses.replace(cache, length=jnp.zeros((batch,), jnp.int32))

  def _generate_rows(self, fields: list[dict], keys_B, *, max_tokens, max_images, temperature, top_k, top_p,
                     steps, cfg_scale, sampler, cfg_interval, clip_x0) -> list[list]:
    n, tok, B = self.num_patches, self.tokenizer, len(fields)
    self._check_length(fields)
    Lp = bucket(max(len(f["tokens"]) for f in fields))
    batch, lengths_B = right_pad(fields, Lp)
    capacity = _round_up(Lp + max_tokens + max_images * (n + 1), 64)
    logits_BV, cache = self._prefill_rows(self.params, batch, jnp.asarray(lengths_B), self._row_cache(B, capacity))
    guided = cfg_scale != 1.0
    if guided:  # the unconditional branch `BOS BOI` of every row, cached once
      upiece = self.image_start_piece([], bos=True)
      ubatch, ulengths = right_pad([upiece] * B, len(upiece["tokens"]))
      ucache = self._prefill_rows(self.params, ubatch, jnp.asarray(ulengths), self._row_cache(B, capacity))[1]
    last_B = np.array([f["tokens"][-1] for f in fields])
    images_B = np.array([f["image_ids"].max() for f in fields], np.int32)
    made_B, left_B = np.zeros(B, np.int32), np.full(B, max_tokens, np.int32)
    finished_B, out = np.zeros(B, bool), [[] for _ in range(B)]
    while not finished_B.all():
      wants_image_B = ~finished_B & (last_B == tok.boi_id) & (made_B < max_images)
      if wants_image_B.any():
        split = jax.vmap(jax.random.split)(keys_B)
        active = jnp.asarray(wants_image_B)
        keys_B = jnp.where(active[:, None], split[:, 0], keys_B)
        image_id_B = jnp.asarray(images_B + made_B + 1)
        x_T_BnP, step_keys = kernels.initial_noise(split[:, 1], (n, self.patch_dim))
        both, start_X = cache, cache.length
        if guided:
          both, start_X = kernels.stack_caches(cache, ucache), jnp.concatenate([cache.length, ucache.length])
        x0_BnP = self._denoise(self.params, self.schedule, both, x_T_BnP, start_X,
                               jnp.concatenate([image_id_B, jnp.ones_like(image_id_B)]) if guided else image_id_B,
                               step_keys, self._step_scales(steps, cfg_scale, cfg_interval), steps=steps,
                               sampler=sampler,
                               prediction=self.prediction, guided=guided, pad_id=tok.pad_id,
                               clip_x0=clip_x0)
        new_BV, cache = self._commit(self.params, cache, x0_BnP, cache.length, image_id_B, active_B=active)
        logits_BV = jnp.where(active[:, None], new_BV, logits_BV)
        images = self.patches_to_images(x0_BnP)
        for b in np.flatnonzero(wants_image_B):
          out[b].append(images[b])
        made_B, last_B = made_B + wants_image_B, np.where(wants_image_B, tok.eoi_id, last_B)
        continue
      texting_B = ~finished_B & (last_B != tok.eos_id) & (left_B > 0)
      finished_B |= ~texting_B
      if not texting_B.any():
        break
      banned_BV = jnp.where(jnp.asarray(made_B < max_images)[:, None], self._text_or_image[None], self._text_only[None])
      tokens_BT, taken_B, cache, logits_BV, keys_B = self._decode_rows(
          self.params, cache, logits_BV, keys_B, jnp.asarray(texting_B), jnp.asarray(left_B), banned_BV,
          self._eos_or_boi, max_new=max_tokens, temperature=float(temperature), top_k=int(top_k),
          top_p=float(top_p))
      tokens_BT, taken_B = (np.asarray(distributed.addressable(a)) for a in (tokens_BT, taken_B))
      for b in np.flatnonzero(texting_B):
        ids = tokens_BT[b, :taken_B[b]]
        text = self._text_until(ids)
        if text:
          out[b].append(text)
        if len(ids):
          last_B[b] = ids[-1]
      left_B -= taken_B
      finished_B |= texting_B & (taken_B == 0)
    return out

  def log_likelihood(self, texts: list[str], *, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log p over `text EOS` given BOS, number of predicted tokens) per text."""
    from tfx.data import examples

    def run(chunk, first):
      pieces = [examples.text_example(self.tokenizer.encode(t), self.tokenizer, self.patch_dim) for t in chunk]
      batch, _ = left_pad(pieces, bucket(max(len(p["tokens"]) for p in pieces)))
      logp_BL, mask_BL = self._log_probs(self.params, batch)
      logp_BL = np.asarray(distributed.addressable(logp_BL), np.float64)
      mask_BL = np.asarray(distributed.addressable(mask_BL))
      return list(zip((logp_BL * mask_BL).sum(-1), mask_BL.sum(-1)))

    rows = self._in_batches(list(texts), batch_size, run)
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows], np.int64)
