"""The inference engine against full forward passes of a tiny random model."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tfx import config as tfx_config
from tfx import generate, record
from tfx.generation import kernels
from tfx import model as model_lib
from tfx.data import examples, shapes
from tfx.data import tokenizer as tokenizer_lib

PROMPTS = ["a red circle", "two blue squares"]


def tiny_config():
  c = tfx_config.default()
  c.model.vocab_size = 48            # > tokenizer size: the unusable ids must never be sampled
  c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
  c.image.resolution, c.image.patch_size = 16, 4
  c.diffusion.prediction = "v"       # no 1/sqrt(alpha_bar) blow-up, so whole loops compare tightly
  return c


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_model(shapes.grammar_captions(np.random.default_rng(0), 400), 40))


@pytest.fixture(scope="module")
def gen(tok):
  c = tiny_config()
  return generate.Generator(c, model_lib.build_model(c, nnx.Rngs(0)), tokenizer=tok)


_forward = jax.jit(kernels.forward, static_argnums=0, static_argnames="read_only")


def full_forward(gen, batch, t_BL=None, cache=None, read_only=False):
  """The model on a whole batch (jitted, so each shape compiles once)."""
  t_BL = jnp.zeros(batch["tokens"].shape, jnp.float32) if t_BL is None else t_BL
  return _forward(gen.graphdef, gen.params, {k: jnp.asarray(v) for k, v in batch.items()}, t_BL, cache,
                  read_only=read_only)


def with_tokens(gen, piece, ids):
  return generate.concat_pieces([piece, examples.text_example(ids, gen.tokenizer, gen.patch_dim, bos=False,
                                                              eos=False)])


def test_cached_decoding_matches_full_forward(gen, tok):
  pieces = [gen.text_piece(p, bos=True) for p in PROMPTS]
  logits_BV, cache, lengths_B, Lp = gen._prefill_prompts(pieces, 8)
  padded, _ = generate.left_pad(pieces, Lp)
  np.testing.assert_allclose(logits_BV, full_forward(gen, padded)[0][:, -1], atol=1e-5, rtol=0)
  no_stop = jnp.zeros(48, bool)
  for k in range(1, 6):
    tokens_BT, steps, _, next_BV = gen._decode_text(cache, logits_BV, lengths_B, jax.random.PRNGKey(0), limit=k,
                                                    max_new=8, banned=gen._text_only, stop=no_stop,
                                                    temperature=0.0, top_k=0, top_p=1.0)
    assert steps == k and (tokens_BT[:, k:] == tok.pad_id).all()
    # extra left padding (segment 0) keeps one reference shape for every k
    ref, _ = generate.left_pad([with_tokens(gen, p, row[:k]) for p, row in zip(pieces, tokens_BT)], Lp + 8)
    ref_BLV = np.asarray(full_forward(gen, ref)[0])
    np.testing.assert_allclose(next_BV, ref_BLV[:, -1], atol=1e-5, rtol=0)
    allowed_BLV = np.where(np.asarray(gen._text_only), -np.inf, ref_BLV[:, -k - 1:-1])
    np.testing.assert_array_equal(tokens_BT[:, :k], allowed_BLV.argmax(-1))
  assert tokens_BT.max() < tok.vocab_size


def check_cached_denoise_step(gen):
  """One denoising step of conditional and unconditional rows on the n patches only (KV cache)
  equals the model on [prefix ; image] uncached; returns what the guided-loop check needs."""
  n, P = gen.num_patches, gen.patch_dim
  pieces = [gen.image_start_piece(gen.tokenizer.encode(p), bos=True) for p in PROMPTS]
  _, cache, lengths_B, Lp = gen._prefill_prompts(pieces, n + 1)
  ucache, ulengths_B, _ = gen._unconditional_cache(2, cache.max_len, Lp)
  both = kernels.stack_caches(cache, ucache)
  start_X = jnp.asarray(np.concatenate([lengths_B, ulengths_B]))
  x_XnP = jax.random.normal(jax.random.PRNGKey(1), (4, n, P))
  t_Xn = jnp.full((4, n), 700.0)
  cached = full_forward(gen, kernels.image_batch(x_XnP, start_X, 1, 0), t_Xn, both)[1]
  # a read-only step (the cache is read, never written) equals the step that writes its patches
  read_only, unchanged = full_forward(gen, kernels.image_batch(x_XnP, start_X, 1, 0), t_Xn, both, read_only=True)[1:]
  np.testing.assert_allclose(read_only, cached, atol=1e-5, rtol=0)
  assert unchanged.length == both.length
  prefix, _ = generate.left_pad(pieces + [gen.image_start_piece([], bos=True)] * 2, Lp)
  image = kernels.image_batch(x_XnP, start_X, 1, 0)
  batch = {k: jnp.concatenate([jnp.asarray(prefix[k]), image[k]], axis=1) for k in image}
  t_XL = jnp.concatenate([jnp.zeros((4, Lp)), t_Xn], axis=1)
  np.testing.assert_allclose(cached, full_forward(gen, batch, t_XL)[1][:, Lp:], atol=1e-5, rtol=0)
  return pieces, cache, lengths_B, Lp, both, start_X, x_XnP, prefix


def test_cached_denoise_step_matches_full_forward(gen):
  """Conditional and unconditional rows, each step on the n patches only, vs [prefix ; image] uncached."""
  n = gen.num_patches
  pieces, cache, lengths_B, Lp, both, start_X, x_XnP, prefix = check_cached_denoise_step(gen)

  # the whole guided loop, cached vs recomputing the prefix at every step
  keys = kernels.index_keys(0, 0, 2)
  args = dict(steps=3, sampler="ddpm", prediction="v", guided=True, pad_id=0)
  fast = gen._denoise(gen.params, gen.schedule, both, x_XnP[:2], start_X, jnp.int32(1), keys, jnp.float32(3.0),
                      **args)
  slow = gen._denoise_recompute(gen.params, gen.schedule, {k: jnp.asarray(v) for k, v in prefix.items()},
                                x_XnP[:2], start_X, jnp.int32(1), keys, jnp.float32(3.0), **args)
  np.testing.assert_allclose(fast, slow, atol=1e-4, rtol=0)
  writing = gen._denoise(gen.params, gen.schedule, both, x_XnP[:2], start_X, jnp.int32(1), keys, jnp.float32(3.0),
                         read_only=False, **args)
  np.testing.assert_allclose(fast, writing, atol=1e-5, rtol=0)

  # text after a finished image: commit [patches ; EOI] and compare the next-token logits
  x0_BnP = x_XnP[:2]
  logits_BV, _ = gen._commit(gen.params, cache, x0_BnP, jnp.asarray(lengths_B), jnp.int32(1))
  full = [examples.image_text_example(gen.tokenizer.encode(p), np.asarray(x), gen.tokenizer, eos=False)
          for p, x in zip(PROMPTS, x0_BnP)]
  ref, _ = generate.left_pad(full, Lp + n + 1)
  np.testing.assert_allclose(logits_BV, full_forward(gen, ref)[0][:, -1], atol=1e-5, rtol=0)


def test_unet_patch_layers_in_the_cached_denoise_step(tok):
  """The U-Net (the default's encoder) groups patches by image: a step on the n patches alone,
  after a cached prefix, must see the same image as the whole sequence does."""
  c = tiny_config()
  c.model.encoder, c.model.unet_channels, c.model.image_pos_embed = "unet", (8, 16), "sincos2d"
  check_cached_denoise_step(generate.Generator(c, model_lib.build_model(c, nnx.Rngs(0)), tokenizer=tok))


def test_same_seed_same_images_bit_for_bit(gen):
  for sampler in ("ddim", "ddpm"):
    a = gen.text_to_image(PROMPTS, seed=3, steps=3, sampler=sampler)
    b = gen.text_to_image(PROMPTS, seed=3, steps=3, sampler=sampler)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, gen.text_to_image(PROMPTS, seed=4, steps=3, sampler=sampler))
  # a new seed or prompt of the same padded length reuses the compiled denoising program, and so does
  # a ragged last batch (padded); a sample's noise depends on its index, not on the batching
  compiled = gen._denoise._cache_size()
  gen.text_to_image(["one red square", "a circle"], seed=5, steps=3, sampler="ddpm")
  three = gen.text_to_image(PROMPTS + ["a circle"], seed=3, steps=3, sampler="ddpm", batch_size=2)
  assert gen._denoise._cache_size() == compiled
  np.testing.assert_array_equal(three[:2], a)


def test_prompt_layouts_match_training_examples(gen, tok):
  n, P = gen.num_patches, gen.patch_dim
  patches = np.random.default_rng(0).normal(size=(n, P)).astype(np.float32)
  # the unconditional prefix is what caption dropout leaves before the patches: BOS BOI
  dropped = examples.image_text_example([], patches, tok, caption_first=True)
  np.testing.assert_array_equal(gen.image_start_piece([], bos=True)["tokens"], dropped["tokens"][:2])
  # a captioning prompt is an image-first pair up to its caption
  pair = examples.image_text_example(tok.encode("a red circle"), patches, tok, caption_first=False)
  prompt = gen.image_piece(patches, bos=True)
  for k in ("tokens", "modality", "image_ids", "patches"):
    np.testing.assert_array_equal(prompt[k], pair[k][:n + 3])
  joined = generate.concat_pieces([prompt, gen.text_piece("a", bos=False), gen.image_piece(patches, bos=False)])
  assert joined["image_ids"].max() == 2 and (joined["image_ids"][joined["modality"] == record.TEXT] == 0).all()


def test_sample_tokens_filters():
  logits_BV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.PRNGKey(0)
  greedy = generate.sample_tokens(logits_BV, keys, temperature=0.0)
  assert (greedy == 0).all()
  top2 = np.asarray(generate.sample_tokens(logits_BV, keys, temperature=1.0, top_k=2))
  assert set(np.unique(top2)) == {0, 1}
  nucleus = np.asarray(generate.sample_tokens(logits_BV, keys, temperature=1.0, top_p=0.9))
  assert set(np.unique(nucleus)) == {0, 1, 2}  # 0.5 + 0.3 < 0.9 so the third token is still in
  full = np.asarray(generate.sample_tokens(logits_BV, keys, temperature=1.0))
  assert abs((full == 0).mean() - 0.5) < 0.05 and (full == 3).any()


def test_caption_and_complete_batch(gen, tok, tmp_path):
  images = gen.text_to_image(PROMPTS, seed=0, steps=3)
  Image.fromarray(images[0]).save(tmp_path / "a.png")
  caps = gen.caption([str(tmp_path / "a.png"), images[1][:8]], max_tokens=6)  # a path; any size is resized
  assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
  assert gen.caption([images[1][:8], images[0]], max_tokens=6) == caps[::-1]  # greedy, row-independent
  texts = gen.complete(PROMPTS, max_tokens=6, temperature=1.0, top_k=5, seed=1)
  assert texts == gen.complete(PROMPTS, max_tokens=6, temperature=1.0, top_k=5, seed=1)
  with pytest.raises(generate.ImageReadError):
    gen.caption([np.zeros((8, 8), np.uint8)])


def test_log_likelihood_matches_forward_and_ignores_padding(gen, tok):
  lp, count = gen.log_likelihood(["a red circle", "two"])
  alone, _ = gen.log_likelihood(["two"])
  np.testing.assert_allclose(lp[1], alone[0], atol=1e-4)
  ex = examples.text_example(tok.encode("two"), tok, gen.patch_dim)
  batch, _ = generate.left_pad([ex], len(ex["tokens"]))
  logp = jax.nn.log_softmax(full_forward(gen, batch)[0][0], axis=-1)
  ids = ex["tokens"]
  assert count[1] == len(ids) - 1
  np.testing.assert_allclose(lp[1], sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)), atol=1e-4)


def rigged(gen, token_id: int):
  """The same engine (and compiled programs) with params rigged so greedy decoding always wants
  `token_id`: blocks output zero, every embedding has a large first coordinate, and only that
  token's LM-head column reads it."""
  model = nnx.clone(nnx.merge(gen.graphdef, gen.params))  # merge shares the fixture's Variables
  for block in model.blocks:
    block.attn.o.kernel[...] = jnp.zeros_like(block.attn.o.kernel[...])
    block.mlp.down.kernel[...] = jnp.zeros_like(block.mlp.down.kernel[...])
  model.embed.table[...] = model.embed.table[...].at[:, 0].set(100.0)
  model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...]).at[0, token_id].set(1.0)
  out = copy.copy(gen)
  out.load_params(model)
  return out


def test_decoding_stops_at_eos(gen, tok):
  eos_loving = rigged(gen, tok.eos_id)
  pieces = [gen.text_piece(p, bos=True) for p in PROMPTS]
  logits_BV, cache, lengths_B, _ = eos_loving._prefill_prompts(pieces, 8)
  tokens_BT, steps, _, _ = eos_loving._decode_text(cache, logits_BV, lengths_B, jax.random.PRNGKey(0), limit=8,
                                                   max_new=8, banned=gen._text_only, stop=gen._eos,
                                                   temperature=0.0, top_k=0, top_p=1.0)
  assert steps == 1 and (tokens_BT[:, 0] == tok.eos_id).all() and (tokens_BT[:, 1:] == tok.pad_id).all()
  assert eos_loving.complete(PROMPTS, max_tokens=8) == ["", ""]


def test_generate_interleaved_several_images(gen, tok):
  out = rigged(gen, tok.boi_id).generate(["a red circle"], max_tokens=4, max_images=2, steps=3)
  assert [type(o).__name__ for o in out] == ["ndarray", "ndarray", "str"]
  assert out[0].shape == (16, 16, 3) and out[0].dtype == np.uint8
  # an image in the prompt, then a forced image: the output starts with that image
  out = gen.generate([out[0], "a red circle"], image_next=True, max_tokens=4, max_images=1, steps=3)
  assert out[0].shape == (16, 16, 3)
  with pytest.raises(ValueError, match="empty"):
    gen.generate(["", ""])


def test_scan_layers_model_in_the_jitted_loops(tok):
  """nnx.scan over layers inside lax loops needs the params carried through the loop state."""
  c = tiny_config()
  c.model.scan_layers = True
  scan_gen = generate.Generator(c, model_lib.build_model(c, nnx.Rngs(0)), tokenizer=tok)
  assert scan_gen.text_to_image(PROMPTS[:1], steps=2).shape == (1, 16, 16, 3)
  assert isinstance(scan_gen.complete(PROMPTS[:1], max_tokens=3)[0], str)


def chained(gen, chain: dict[int, int]):
  """The engine with params rigged so greedy decoding after token u picks chain[u] (the blocks
  still run, so images depend on their context): u's embedding has a large coordinate of its own
  that only chain[u]'s LM-head column reads."""
  model = nnx.clone(nnx.merge(gen.graphdef, gen.params))  # merge shares the fixture's Variables
  head = jnp.zeros_like(model.lm_head.kernel[...])
  for coord, (u, nxt) in enumerate(chain.items()):
    model.embed.table[...] = model.embed.table[...].at[u, coord].set(100.0)
    head = head.at[coord, nxt].set(1.0)
  model.lm_head.kernel[...] = head
  out = copy.copy(gen)
  out.load_params(model)
  return out


def uncached_interleaved(gen, prompt_fields, *, seed, max_tokens, steps, cfg_scale):
  """Greedy interleaved generation the slow way: the whole sequence through the model for every
  token, the whole prefix at every denoising step (one image, then text to EOS)."""
  tok, n, P = gen.tokenizer, gen.num_patches, gen.patch_dim
  seq, key, out, made, left = dict(prompt_fields), kernels.index_keys(seed, 0, 1)[0], [], 0, max_tokens
  text = []
  while True:
    if seq["tokens"][-1] == tok.boi_id and made < 1:
      if text:
        out.append(tok.decode(text))
      text = []
      key, noise_key = jax.random.split(key)  # a row's stream splits once per image and per token
      uncond = gen.image_start_piece([], bos=True)
      prefix, starts = generate.left_pad([seq, uncond], len(seq["tokens"]))
      x_T, step_keys = kernels.initial_noise(noise_key[None], (n, P))
      x0 = gen._denoise_recompute(gen.params, gen.schedule, {k: jnp.asarray(v) for k, v in prefix.items()}, x_T,
                                  jnp.asarray(starts), jnp.int32(seq["image_ids"].max() + 1), step_keys,
                                  jnp.float32(cfg_scale), steps=steps, sampler="ddim", prediction=gen.prediction,
                                  guided=True, pad_id=tok.pad_id)
      image = dict(tokens=np.array([tok.pad_id] * n + [tok.eoi_id], np.int32),
                   patches=np.concatenate([np.asarray(x0[0]), np.zeros((1, P), np.float32)]),
                   modality=np.array([record.IMAGE] * n + [record.TEXT], np.int32), image_ids=np.zeros(n + 1, np.int32))
      seq = generate.concat_pieces([seq, image])
      out.append(gen.patches_to_images(x0)[0])
      made += 1
      continue
    if left == 0 or seq["tokens"][-1] == tok.eos_id:
      break
    key = jax.random.split(key)[0]
    batch, _ = generate.left_pad([seq], len(seq["tokens"]))
    logits = np.asarray(full_forward(gen, batch)[0][0, -1])
    banned = np.asarray(gen._text_or_image if made < 1 else gen._text_only)
    nxt = int(np.where(banned, -np.inf, logits).argmax())
    seq = with_tokens(gen, seq, [nxt])
    left -= 1
    if nxt not in (tok.eos_id, tok.boi_id):
      text.append(nxt)
  if text:
    out.append(tok.decode(text))
  return out


def test_interleaved_text_image_text_equals_uncached(gen, tok):
  """A rigged model answers the prompt with a word, BOI, (the image), a word, EOS: the cached
  engine gives text, an image denoised against the whole context, then text, as the step-by-step
  uncached computation does."""
  prompt = [{"text": "a red circle"}]
  last = tok.encode("a red circle")[-1]
  w1, w2 = tok.encode("blue")[0], tok.encode("two")[0]
  rig = chained(gen, {last: w1, w1: tok.boi_id, tok.eoi_id: w2, w2: tok.eos_id})
  out = rig.generate(prompt, seed=7, max_tokens=6, max_images=1, steps=3, cfg_scale=3.0, sampler="ddim")
  assert [type(o).__name__ for o in out] == ["str", "ndarray", "str"]
  assert out[0] == tok.decode([w1]) and out[2] == tok.decode([w2])
  fields = generate.concat_pieces([gen.text_piece("a red circle", bos=True)])
  ref = uncached_interleaved(rig, fields, seed=7, max_tokens=6, steps=3, cfg_scale=3.0)
  assert out[0] == ref[0] and out[2] == ref[2]
  assert np.abs(out[1].astype(int) - ref[1].astype(int)).max() <= 1  # uint8 rounding of ~1e-5 differences
  # the image depends on the text before it: another prompt, another image (same seed)
  other = rig.generate(["two blue squares", {"text": "a red circle"}], seed=7, max_tokens=6, steps=3,
                       cfg_scale=3.0, sampler="ddim")
  assert not np.array_equal(other[1], out[1])
  with pytest.raises(ValueError, match="prompt piece"):
    gen.generate([{"words": "a"}])


def test_a_row_does_not_depend_on_its_batch_mates(gen, tok):
  """Batched sampling equals one prompt at a time, bit for bit (prompts of different lengths)."""
  prompts = ["a red circle", "two blue squares to the left of a circle", "one"]
  together = gen.text_to_image(prompts, seed=2, steps=2, sampler="ddpm")
  for i, p in enumerate(prompts):
    np.testing.assert_array_equal(gen.text_to_image([p], seed=2, first_index=i, steps=2, sampler="ddpm")[0],
                                  together[i])
  caps = gen.caption(list(together), max_tokens=5)
  assert caps == [gen.caption([img], max_tokens=5)[0] for img in together]


def test_interleaved_batch_equals_one_by_one(gen, tok):
  """Rows of different lengths that emit their images at different times, in one batch, give what
  each gives alone, bit for bit (per-row cache lengths and PRNG streams)."""
  prompts = [["a red circle"], ["two blue squares", {"text": "to the left of"}]]
  a, b = (tok.encode(" ".join(x if isinstance(x, str) else x["text"] for x in p))[-1] for p in prompts)
  w1, w2 = tok.encode("blue")[0], tok.encode("two")[0]
  assert len({a, b, w1, w2, tok.eoi_id}) == 5
  rig = chained(gen, {a: tok.boi_id, b: w1, w1: w2, w2: tok.boi_id, tok.eoi_id: tok.eos_id})
  kw = dict(seed=5, max_tokens=6, max_images=1, steps=2, cfg_scale=3.0, sampler="ddpm")
  together = rig.generate_batch(prompts, **kw)
  assert [[type(o).__name__ for o in row] for row in together] == [["ndarray"], ["str", "ndarray"]]
  for i, p in enumerate(prompts):
    alone = rig.generate_batch([p], first_index=i, **kw)[0]
    assert len(alone) == len(together[i])
    for x, y in zip(alone, together[i]):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # sampled text (per-row PRNG streams) and no guidance
  kw = dict(seed=1, max_tokens=5, max_images=1, temperature=1.0, top_k=8, steps=2, cfg_scale=1.0)
  together = gen.generate_batch([["a red circle"], ["two"], ["one blue square"]], **kw)
  assert together[1] == gen.generate(["two"], first_index=1, **kw)


def test_guidance_interval(gen):
  """cfg_interval (0, 1) guides every step, as before it existed; an interval that holds no step
  samples the conditional prediction alone (cfg_scale 1, to float rounding); one that holds some
  steps is neither."""
  kw = dict(seed=3, steps=4, sampler="ddim", cfg_scale=3.0)   # steps at t = 999, 666, 333, 0
  full = gen.text_to_image(PROMPTS, **kw)
  np.testing.assert_array_equal(gen.text_to_image(PROMPTS, cfg_interval=(0.0, 1.0), **kw), full)
  unguided = gen.text_to_image(PROMPTS, **{**kw, "cfg_scale": 1.0}).astype(int)
  none = gen.text_to_image(PROMPTS, cfg_interval=(0.4, 0.6), **kw).astype(int)
  assert np.abs(none - unguided).max() <= 1 and np.abs(none - full.astype(int)).max() > 8
  low = gen.text_to_image(PROMPTS, cfg_interval=(0.0, 0.5), **kw).astype(int)
  assert min(np.abs(low - unguided).max(), np.abs(low - full.astype(int)).max()) > 8
  gen.config.diffusion.cfg_interval = (0.4, 0.6)   # the config's interval is the default
  try:
    np.testing.assert_array_equal(gen.text_to_image(PROMPTS, **kw).astype(int), none)
  finally:
    gen.config.diffusion.cfg_interval = (0.0, 1.0)
  with pytest.raises(ValueError, match="cfg_interval must satisfy"):
    gen.text_to_image(PROMPTS, cfg_interval=(0.6, 0.4), **kw)
  # interleaved generation guides its images the same way
  kwi = dict(seed=3, max_tokens=1, max_images=1, image_next=True, steps=4, sampler="ddim")
  image = lambda **k: gen.generate_batch([["a red circle"]], **kwi, **k)[0][0].astype(int)
  assert np.abs(image(cfg_scale=3.0, cfg_interval=(0.4, 0.6)) - image(cfg_scale=1.0)).max() <= 1
  assert np.abs(image(cfg_scale=3.0) - image(cfg_scale=1.0)).max() > 8


def test_clip_x0(gen):
  """clip_x0 changes what an untrained model's overshooting x0 predictions draw; a bound no
  prediction reaches equals no clipping; the config's value is the default; a bad one is refused."""
  kw = dict(seed=3, steps=4, sampler="ddim", cfg_scale=3.0)
  off = gen.text_to_image(PROMPTS, **kw).astype(int)
  assert np.abs(gen.text_to_image(PROMPTS, clip_x0=1.0, **kw).astype(int) - off).max() > 8
  assert np.abs(gen.text_to_image(PROMPTS, clip_x0=1e6, **kw).astype(int) - off).max() <= 1
  gen.config.diffusion.clip_x0 = 1.0
  try:
    np.testing.assert_array_equal(gen.text_to_image(PROMPTS, **kw).astype(int),
                                  gen.text_to_image(PROMPTS, clip_x0=1.0, **kw).astype(int))
    np.testing.assert_array_equal(gen.text_to_image(PROMPTS, clip_x0=0.0, **kw).astype(int), off)
  finally:
    gen.config.diffusion.clip_x0 = 0.0
  with pytest.raises(ValueError, match="clip_x0 must be a number >= 0"):
    gen.text_to_image(PROMPTS, clip_x0=-1.0, **kw)
  kwi = dict(max_tokens=1, max_images=1, image_next=True, **kw)   # interleaved images too
  image = lambda **k: gen.generate_batch([["a red circle"]], **kwi, **k)[0][0].astype(int)
  assert np.abs(image(clip_x0=1.0) - image()).max() > 8


def test_caption_log_likelihood_matches_forward_and_ignores_batch_mates(gen, tok):
  """log p(caption EOS | BOS BOI image EOI), summed over the caption's targets only, as a full
  forward of the image-first training layout gives it; a pair's value does not depend on its batch."""
  images = gen.text_to_image(PROMPTS, seed=1, steps=2)
  captions = ["a red circle", "two blue squares to the left of a green triangle"]
  both = gen.caption_log_likelihood(list(images), captions)
  alone = gen.caption_log_likelihood([images[0]], captions[:1])
  np.testing.assert_allclose(both[0], alone[0], atol=1e-4)
  ids = tok.encode(captions[1])
  ex = examples.image_text_example(ids, gen.image_patches([images[1]])[0], tok, caption_first=False)
  batch, _ = generate.left_pad([ex], len(ex["tokens"]))
  logp = jax.nn.log_softmax(full_forward(gen, batch)[0][0], axis=-1)
  tokens = ex["tokens"]
  first = int(np.flatnonzero(tokens == tok.eoi_id)[0]) + 1       # the caption's first token
  assert list(tokens[first:]) == list(ids) + [tok.eos_id]
  np.testing.assert_allclose(both[1], sum(float(logp[i - 1, tokens[i]]) for i in range(first, len(tokens))),
                             atol=1e-4)
  with pytest.raises(ValueError, match="2 images but 1 captions"):
    gen.caption_log_likelihood(list(images), captions[:1])


def test_best_of_keeps_the_likeliest_draw(gen):
  """best_of 1 is the plain draw; with more draws each row keeps an image whose caption likelihood
  is at least the plain draw's and grows with K; rows do not depend on their batch-mates; the
  config's value is the default; a bad one is refused."""
  prompts = PROMPTS + ["three green triangles"]
  kw = dict(seed=3, steps=2, sampler="ddim")
  plain = gen.text_to_image(prompts, **kw)
  np.testing.assert_array_equal(gen.text_to_image(prompts, best_of=1, **kw), plain)
  two, three = (gen.text_to_image(prompts, best_of=k, **kw) for k in (2, 3))
  ll = [gen.caption_log_likelihood(list(images), prompts) for images in (plain, two, three)]
  assert np.all(ll[1] >= ll[0] - 1e-6) and np.all(ll[2] >= ll[1] - 1e-6)
  assert not np.array_equal(three, plain)          # an untrained model's draws are ranked differently
  np.testing.assert_array_equal(gen.text_to_image(prompts, best_of=3, batch_size=2, **kw), three)
  gen.config.diffusion.best_of = 3
  try:
    np.testing.assert_array_equal(gen.text_to_image(prompts, **kw), three)
  finally:
    gen.config.diffusion.best_of = 1
  with pytest.raises(ValueError, match="best_of must be an integer >= 1"):
    gen.text_to_image(prompts, best_of=0, **kw)
