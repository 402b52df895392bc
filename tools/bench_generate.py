"""Times tfx.generate on this machine (random weights: speed does not depend on them).

  python tools/bench_generate.py [--config experiments/shapes.py] [--batch 8] [--repeats 3]

Prints seconds per image at 50 and 250 DDIM/DDPM steps with guidance, and the
speed-up of denoising against the cached prefix over recomputing the prefix at
every step, for prompts of 16, 128 and 1024 tokens. Compile time is excluded
(each program runs twice before it is timed); the best of `repeats` runs is kept,
and the cached and recomputing paths are timed alternately.
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


def paired_best_times(fn_a, fn_b, repeats: int) -> tuple[float, float]:
  """Best times of two functions measured alternately, so load from other processes hits both alike."""
  for fn in (fn_a, fn_b):
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times_a, times_b = [], []
  for _ in range(repeats):
    for fn, times in ((fn_a, times_a), (fn_b, times_b)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
  return min(times_a), min(times_b)


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

    fast, slow = paired_best_times(cached, recompute, 1 if length > 128 else repeats)
    diff = float(jnp.max(jnp.abs(cached() - recompute())))
    print(f"prompt {length:5d} tokens, {steps} ddim steps, cfg: cached {fast:7.3f} s  recompute {slow:7.3f} s"
          f"  speed-up x{slow / fast:5.1f}  (max |diff| {diff:.1e})", flush=True)


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
  args = p.parse_args()
  config = load_config(args.config, args.config_arg)
  model = model_lib.build_model(config, nnx.Rngs(0))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"{args.config}:{args.config_arg} params {params / 1e6:.2f}M, devices {jax.devices()}", flush=True)
  gen = Generator(config, model)
  if not args.skip_per_image:
    per_image(gen, args.batch, args.repeats)
  if not args.skip_speedup:
    cache_speedup(gen, args.speedup_steps, args.repeats, [int(x) for x in args.lengths.split(",")])


if __name__ == "__main__":
  main()
