"""`python -m tfx.bench`: the speed benchmark: attention TFLOP/s and train-step MFU per model size.

  python -m tfx.bench --sizes=shapes,0.16B,0.37B [--steps=5] [--out=bench.json] [--check]

For each size (`shapes` is experiments/shapes.py's default, the others experiments/transfusion.py):
  - attention alone, one layer at the size's shape (its per-device batch, sequence, heads, head
    dim; the model's dtype) on two masks: the dry run's records packed like the config's data mix
    (`tfx.dryrun.random_batch`: text documents and caption-image pairs) and one causal text
    segment per row. Paths: dense
    (XLA, the [L, S] mask), flash (tfx/model/flash.py: Triton on a GPU, Mosaic on a TPU; on a CPU
    only with --interpret, slowly),
    and cuDNN's causal kernel (`jax.nn.dot_product_attention`, GPUs). FLOP/s count the causal
    half of L x L for every path (forward 4 B H K L^2 / 2, forward + backward 3.5x that), so
    they compare as inverse times;
  - the train step (tfx.dryrun.report with --steps timed steps on those records): step time,
    tokens/s, MFU, peak memory. A size whose compiled step needs more memory than the device
    has is reported as skipped, with the estimate.
--check first compares the flash kernel with the dense path on this device (outputs and
gradients, fp32 and bf16). Every result is printed as a JSON line and written to --out as it
lands, so a run cut short keeps what it measured.
"""
import ast
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tfx import dryrun, record
from tfx.model import attention, presets

PAPER_SIZES = tuple(presets.PAPER_SIZES)
# Sequences per device for the paper sizes: one device's share of the paper's 2M-token batch
# on 16 (0.16B, 0.37B), 32 (0.76B, 1.4B) or 256 devices (7B).
BATCH = {"0.16B": 32, "0.37B": 32, "0.76B": 16, "1.4B": 16, "7B": 2}
EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


class BenchError(ValueError):
  """Flags that name no benchmark."""


def load_config(size: str, experiments_dir: str = EXPERIMENTS):
  """The config the benchmark runs for `size` ("shapes" or a paper size)."""
  import importlib.util
  name = "shapes" if size == "shapes" else "transfusion"
  path = os.path.join(experiments_dir, f"{name}.py")
  if size != "shapes" and size not in PAPER_SIZES:
    raise BenchError(f"unknown size {size!r}; choose from shapes, {', '.join(PAPER_SIZES)}")
  if not os.path.exists(path):
    raise BenchError(f"{path} not found; run from a tfx checkout or pass --experiments_dir")
  spec = importlib.util.spec_from_file_location(f"tfx_bench_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if size == "shapes":
    return module.get_config("")
  config = module.get_config(f"size={size}")
  config.global_batch_size = BATCH[size]
  return config


def _median_seconds(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _masks(config):
  """(segment, horizon) of the dry run's data-mix records and of one causal segment per row."""
  B, L = config.global_batch_size, config.seq_len
  mix = dryrun.random_batch(config, np.random.default_rng(config.seed))
  horizon = attention.horizon(jnp.asarray(mix["image_ids"]), jnp.asarray(mix["modality"]))
  causal = (jnp.ones((B, L), jnp.int32), jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)))
  return {"data_mix": (jnp.asarray(mix["segment_ids"]), horizon), "causal": causal}


def _attention_paths(segment, horizon, causal: bool, interpret: bool) -> dict:
  backend = jax.default_backend()
  paths = {"dense": lambda q, k, v: attention.dot_attention(q, k, v, attention.dense_mask(segment, horizon,
                                                                                           segment))}
  if backend in ("gpu", "tpu") or interpret:
    kernel = attention.flash_kernel(attention.implementation("flash"))
    paths["flash"] = lambda q, k, v: kernel(q, k, v, segment, horizon)
  if causal and backend == "gpu":
    paths["cudnn_causal"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                         implementation="cudnn")
  return paths


def attention_results(size: str, config, *, interpret: bool, reps: int):
  """One result per (mask, path): forward and forward + backward time and causal TFLOP/s."""
  from tfx.model.layers import compute_dtype
  from tfx.model.transfusion import dims
  config = presets.resolve(config)
  m = config.model
  B, L, H, G, K = config.global_batch_size, config.seq_len, m.n_heads, m.n_kv_heads, dims(config)["head_dim"]
  dtype = compute_dtype(m.dtype)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(key, (B, L, h, K), jnp.float32).astype(dtype)
                 for key, h in zip(keys, (H, G, G, H)))
  forward_flops = 4.0 * B * H * K * L * L / 2
  for mask_name, (segment, horizon) in _masks(config).items():
    for path, f in _attention_paths(segment, horizon, mask_name == "causal", interpret).items():
      item = dict(kind="attention", size=size, mask=mask_name, path=path, shape=[B, L, H, G, K],
                  dtype=jnp.dtype(dtype).name)
      try:
        loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))
        t_fwd = _median_seconds(jax.jit(f), q, k, v, reps=reps)
        t_both = _median_seconds(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v, reps=reps)
        item.update(forward_ms=round(t_fwd * 1e3, 3), forward_backward_ms=round(t_both * 1e3, 3),
                    forward_tflops=round(forward_flops / t_fwd / 1e12, 3),
                    forward_backward_tflops=round(3.5 * forward_flops / t_both / 1e12, 3))
      except Exception as e:  # one failing path must not hide the others
        item["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      yield item


def step_result(size: str, config, steps: int) -> dict:
  """The train step's dry-run report with `steps` timed steps, or why it was skipped."""
  item = dict(kind="step", size=size, batch=config.global_batch_size, seq_len=config.seq_len,
              attention=config.model.attention, remat=config.model.remat)
  report = dryrun.report(config, 1, time_steps=steps)
  item.update(params=report["params"], flops_per_step=report["flops_per_step"],
              xla_memory_gib=report["memory_per_device"].get("total_gib"), **report["measured"])
  return item


def apply_overrides(config, overrides: dict):
  """config with each "group.key" (or "key") set to its value (a Python literal, else a string)."""
  with config.unlocked():
    for key, value in overrides.items():
      *groups, name = key.split(".")
      target = config
      for group in groups:
        target = target.get(group)
        if target is None or not hasattr(target, "keys"):
          raise BenchError(f"--set {key}: no config group {group!r}")
      if name not in target:
        raise BenchError(f"--set {key}: no such config key")
      try:
        target[name] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        target[name] = value
  return config


def check_kernel() -> list[dict]:
  """This backend's flash kernels against the dense path: relative errors of out, dq, dk, dv."""
  B, L, H, G, K = 2, 600, 4, 2, 64
  batch = record.random_batch(np.random.default_rng(1), B, L, 64, 1, 1000, max_images=4, min_segments=2)
  segment = jnp.asarray(batch["segment_ids"])
  horizon = attention.horizon(jnp.asarray(batch["image_ids"]), jnp.asarray(batch["modality"]))
  keys = jax.random.split(jax.random.key(1), 4)
  q, k, v, ct = (jax.random.normal(key, (B, L, h, K)) for key, h in zip(keys, (H, G, G, H)))
  mask = attention.dense_mask(segment, horizon, segment)
  kernel = attention.flash_kernel(attention.implementation("flash"))

  def with_grads(f, *xs):
    out, vjp = jax.vjp(f, *xs)
    return (out,) + vjp(ct.astype(out.dtype))

  ref = jax.jit(lambda q, k, v: with_grads(lambda *a: attention._dense_attention(*a, mask), q, k, v))(q, k, v)
  results = []
  for dtype in (jnp.float32, jnp.bfloat16):
    run = jax.jit(lambda q, k, v: with_grads(
        lambda *a: kernel(*a, segment, horizon), q, k, v))
    got = run(*(x.astype(dtype) for x in (q, k, v)))
    rel = {name: float(jnp.linalg.norm((g.astype(jnp.float32) - r).ravel()) / jnp.linalg.norm(r.ravel()))
           for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    results.append(dict(kind="check", dtype=jnp.dtype(dtype).name, rel_err=rel))
  return results


def run(sizes, *, steps: int, attention_only: bool, steps_only: bool, interpret: bool, check: bool,
        out_path: str | None, overrides: dict, reps: int = 10) -> list[dict]:
  """Runs the benchmark; returns (and writes to out_path as they land) the results."""
  results = []

  def emit(item):
    results.append(item)
    print(json.dumps(item), flush=True)
    if out_path:
      with open(out_path, "w") as f:
        json.dump(results, f, indent=1)

  emit(dict(kind="device", device=jax.devices()[0].device_kind, backend=jax.default_backend(),
            jax=jax.__version__))
  configs = {size: apply_overrides(load_config(size), overrides) for size in sizes}
  if check:
    for item in check_kernel():
      emit(item)
  for size, config in configs.items():
    if not steps_only:
      for item in attention_results(size, config, interpret=interpret, reps=reps):
        emit(item)
    if not attention_only:
      emit(step_result(size, config, steps))
  return results


def main(argv=None) -> int:
  from absl import app, flags

  flags.DEFINE_list("sizes", ["shapes"], "shapes and/or paper sizes (0.16B, 0.37B, 0.76B, 1.4B, 7B)")
  flags.DEFINE_integer("steps", 5, "timed train steps per size (after one warm-up)")
  flags.DEFINE_bool("attention_only", False, "time attention alone, not the train step")
  flags.DEFINE_bool("steps_only", False, "time the train step alone, not attention")
  flags.DEFINE_bool("interpret", False, "also time the flash kernel where it has no lowering (interpret mode)")
  flags.DEFINE_bool("check", False, "first compare the flash kernel with the dense path on this device")
  flags.DEFINE_string("out", None, "write the results here as JSON, updated after each one")
  flags.DEFINE_multi_string("set", [], "override a config key for every size, e.g. model.remat=dots")

  def main_(_):
    f = flags.FLAGS
    try:
      if f.steps < 1:
        raise BenchError(f"--steps must be >= 1, got {f.steps}")
      overrides = {}
      for item in f.set:
        key, sep, value = item.partition("=")
        if not sep:
          raise BenchError(f"--set expects key=value, got {item!r}")
        overrides[key] = value
      for size in f.sizes:  # bad sizes and keys fail before anything runs
        apply_overrides(load_config(size), overrides)
      run(f.sizes, steps=f.steps, attention_only=f.attention_only, steps_only=f.steps_only,
          interpret=f.interpret, check=f.check, out_path=f.out, overrides=overrides)
    except (BenchError, dryrun.DryRunError) as e:
      print(f"tfx.bench: {e}", file=sys.stderr)
      return 2
    return 0

  def parse(args):
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      print(f"tfx.bench: {str(e).splitlines()[0]}", file=sys.stderr)
      sys.exit(2)

  app.run(lambda a: sys.exit(main_(a)), argv=argv, flags_parser=parse)
  return 0


if __name__ == "__main__":
  main()
