"""Times tfx.generate on this machine (random weights: speed does not depend on them).

  python tools/bench_generate.py [--config experiments/shapes.py] [--batch 8] [--repeats 3]
  python tools/bench_generate.py --peer        # transfusion-pytorch's workload (/work/shared/bench)

Prints seconds per image at 50 and 250 DDIM/DDPM steps with guidance, and the
speed-up of denoising against the cached prefix over recomputing the prefix at
every step, for prompts of 16, 128 and 1024 tokens. Compile time is excluded
(each program runs twice before it is timed); the best of `repeats` runs is kept,
and the cached and recomputing paths are timed alternately.

--peer mirrors the peer benchmark's sampling workload (dim 256, depth 4, 4 heads,
a 64-token prompt, one 8x8 grid of 16-dim patches, guidance 3, 30 network
evaluations) and prints seconds per image and per guided network evaluation at
batch 1 and 16 for three paths, timed alternately: cached with read-only steps,
cached with steps that write into (a copy of) the cache, and recomputing the prefix.
Each time covers the whole image: prefill of both branches, then the 30 steps.
"""
import argparse
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfx.generation import kernels, prompts
from tfx.generation.engine import Generator
from tfx import model as model_lib


def load_config(path: str, arg: str):
  spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def best_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  jax.block_until_ready(fn())  # the first run of a fresh program is slower (allocations, thread pool)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def paired_best_times(*fns, repeats: int) -> tuple[float, ...]:
  """Best times of functions measured in turn, so load from other processes hits them alike."""
  for fn in fns:
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
  return tuple(min(ts) for ts in times)


def per_image(gen, batch: int, repeats: int) -> None:
  prompts = ["two red circles to the left of a blue square"] * batch
  for sampler in ("ddim", "ddpm"):
    for steps in (50, 250):
      s = best_time(lambda: gen.text_to_image(prompts, steps=steps, sampler=sampler, cfg_scale=3.0), repeats)
      print(f"text_to_image {sampler} {steps:3d} steps cfg 3.0 batch {batch}: {s / batch * 1e3:8.1f} ms/image"
            f"  ({s:.2f} s/batch)", flush=True)


def cache_speedup(gen, steps: int, repeats: int, lengths=(16, 128, 1024)) -> None:
  tok, n, P = gen.tokenizer, gen.num_patches, gen.patch_dim
  rng = np.random.default_rng(0)
  for length in lengths:
    ids = rng.integers(6, tok.vocab_size, length - 2).tolist()  # BOS + ids + BOI = `length` tokens
    piece = gen.image_start_piece(ids, bos=True)
    keys = kernels.index_keys(0, 0, 1)
    x_T = jax.random.normal(keys[0], (1, n, P))
    cfg = jnp.float32(3.0)
    args = dict(steps=steps, sampler="ddim", prediction=gen.prediction, guided=True, pad_id=tok.pad_id)

    def cached():
      _, cache, lengths_B, Lp = gen._prefill_prompts([piece], n)
      ucache, ulengths = gen._unconditional_cache(1, cache.max_len, Lp)
      both = kernels.stack_caches(cache, ucache)
      start = jnp.asarray(np.concatenate([lengths_B, ulengths]))
      return gen._denoise(gen.params, gen.schedule, both, x_T, start, jnp.int32(1), keys, cfg, **args)

    Lp = prompts.bucket(length)
    prefix, lengths_B = prompts.left_pad([piece, gen.image_start_piece([], bos=True)], Lp)
    prefix = {k: jnp.asarray(v) for k, v in prefix.items()}
    start = jnp.asarray(lengths_B)

    def recompute():
      return gen._denoise_recompute(gen.params, gen.schedule, prefix, x_T, start, jnp.int32(1), keys, cfg,
                                    **args)

    fast, slow = paired_best_times(cached, recompute, repeats=1 if length > 128 else repeats)
    diff = float(jnp.max(jnp.abs(cached() - recompute())))
    print(f"prompt {length:5d} tokens, {steps} ddim steps, cfg: cached {fast:7.3f} s  recompute {slow:7.3f} s"
          f"  speed-up x{slow / fast:5.1f}  (max |diff| {diff:.1e})", flush=True)


def peer_config(path: str):
  """experiments/shapes.py reshaped to the peer benchmark's model and image (its README's mirror)."""
  c = load_config(path, "")
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 256, 4, 4, 4
  m.encoder, m.image_pos_embed = "linear", "none"
  c.image.resolution, c.image.patch_size, c.image.max_images_per_seq = 8, 1, 1
  c.autoencoder.latent_channels = 16
  return c


def peer_workload(gen, repeats: int, batches=(1, 16), steps: int = 30, cfg_scale: float = 3.0) -> None:
  tok, n, P = gen.tokenizer, gen.num_patches, gen.patch_dim
  ids = np.random.default_rng(0).integers(6, tok.vocab_size, 62).tolist()  # BOS + 62 + BOI = 64 tokens
  for batch in batches:
    piece = gen.image_start_piece(ids, bos=True)
    keys = kernels.index_keys(0, 0, batch)
    x_T, step_keys = kernels.initial_noise(keys, (n, P))
    cfg = jnp.float32(cfg_scale)
    args = dict(steps=steps, sampler="ddim", prediction=gen.prediction, guided=True, pad_id=tok.pad_id)

    def cached(read_only: bool):
      def run():
        _, cache, lengths_B, Lp = gen._prefill_prompts([piece] * batch, n)
        ucache, ulengths = gen._unconditional_cache(batch, cache.max_len, Lp)
        both = kernels.stack_caches(cache, ucache)
        start = jnp.asarray(np.concatenate([lengths_B, ulengths]))
        return gen._denoise(gen.params, gen.schedule, both, x_T, start, jnp.int32(1), step_keys, cfg,
                            read_only=read_only, **args)
      return run

    def recompute():
      prefix, lengths_B = prompts.left_pad([piece] * batch + [gen.image_start_piece([], bos=True)] * batch,
                                           prompts.bucket(len(piece["tokens"])))
      prefix = {k: jnp.asarray(v) for k, v in prefix.items()}
      return gen._denoise_recompute(gen.params, gen.schedule, prefix, x_T, jnp.asarray(lengths_B), jnp.int32(1),
                                    step_keys, cfg, **args)

    fns = {"cached read-only": cached(True), "cached writing": cached(False), "recompute": recompute}
    best = paired_best_times(*fns.values(), repeats=repeats)
    diff = float(jnp.max(jnp.abs(fns["cached read-only"]() - fns["cached writing"]())))
    for (name, _), s in zip(fns.items(), best):
      print(f"peer workload batch {batch:2d} {name:16s}: {s / batch:8.4f} s/image  "
            f"{s / steps * 1e3:7.2f} ms per guided evaluation of the batch  "
            f"({s / batch / steps * 1e3:6.2f} ms per image)", flush=True)
    print(f"  max |read-only - writing| over the image: {diff:.1e}", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="experiments/shapes.py")
  p.add_argument("--config_arg", default="")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--speedup_steps", type=int, default=50)
  p.add_argument("--lengths", default="16,128,1024", help="prompt lengths for the cache speed-up")
  p.add_argument("--skip_per_image", action="store_true")
  p.add_argument("--skip_speedup", action="store_true")
  p.add_argument("--peer", action="store_true", help="only the peer benchmark's workload, batch 1 and 16")
  args = p.parse_args()
  config = peer_config(args.config) if args.peer else load_config(args.config, args.config_arg)
  model = model_lib.build_model(config, nnx.Rngs(0))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"{args.config}:{args.config_arg} params {params / 1e6:.2f}M, devices {jax.devices()}", flush=True)
  autoencoder = None
  if args.peer:  # 16-channel latents and no autoencoder: the peer workload times denoising, never decodes
    from tfx.autoencoder import PixelAutoencoder
    autoencoder = PixelAutoencoder()
    autoencoder.latent_channels = config.autoencoder.latent_channels
  gen = Generator(config, model, autoencoder=autoencoder)
  if args.peer:
    peer_workload(gen, args.repeats)
    return
  if not args.skip_per_image:
    per_image(gen, args.batch, args.repeats)
  if not args.skip_speedup:
    cache_speedup(gen, args.speedup_steps, args.repeats, [int(x) for x in args.lengths.split(",")])


if __name__ == "__main__":
  main()
