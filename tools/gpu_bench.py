"""One prepared GPU run: flash-kernel parity, attention TFLOP/s, and train-step MFU, as JSON.

  python tools/gpu_bench.py OUT_DIR [--budget_s=420] [--steps=SPEC;SPEC...] [--skip=parity,attention]

SPEC is size:batch:attention:remat[:seq_len] (e.g. 0.37B:16:flash:attention). --smoke shrinks
every shape and runs the kernels in interpret mode, to check this script on a CPU. Each finished measurement is
appended to OUT_DIR/gpu_bench.json at once, so a run cut short keeps what it measured; no new
train-step config starts once --budget_s has passed.

Attention is timed per layer at the 0.37B shape (16 heads of 64, 4096 positions, bf16) on two
masks: the dry run's paper mix (tfx.record.random_batch, 256-patch images, padding) and one
causal text segment per row; FLOP/s count the causal half of L x L (what cuDNN's causal kernel
computes), forward 4 * B * H * K * L^2 / 2, backward 2.5x that, for every path alike.
"""
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tfx import record  # noqa: E402
from tfx.model import attention, flash  # noqa: E402

RESULTS = []
SMOKE = "--smoke" in sys.argv
SHAPE = (2, 256, 2, 64) if SMOKE else (8, 4096, 16, 64)  # per-layer B, L, H, K at 0.37B


def emit(out_dir, item):
  RESULTS.append(item)
  print(json.dumps(item), flush=True)
  with open(os.path.join(out_dir, "gpu_bench.json"), "w") as f:
    json.dump(RESULTS, f, indent=1)


def timed(fn, *args, reps=10):
  """Median seconds of fn(*args) after two warm-ups (compile included in the first)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def masks(B, L, seed=0):
  mix = record.random_batch(np.random.default_rng(seed), B, L, 64 if SMOKE else 256, 32, 32000, max_images=15)
  seg_mix = jnp.asarray(mix["segment_ids"])
  hor_mix = attention.horizon(jnp.asarray(mix["image_ids"]), jnp.asarray(mix["modality"]))
  seg_causal = jnp.ones((B, L), jnp.int32)
  hor_causal = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  return {"paper_mix": (seg_mix, hor_mix), "causal": (seg_causal, hor_causal)}


def parity(out_dir):
  """Triton kernel vs the dense path on the GPU: outputs and gradients, fp32 and bf16."""
  B, L, H, G, K = (2, 200, 4, 2, 64) if SMOKE else (2, 1000, 4, 2, 64)
  batch = record.random_batch(np.random.default_rng(1), B, L, 64, 8, 1000, max_images=4, min_segments=2)
  seg = jnp.asarray(batch["segment_ids"])
  hor = attention.horizon(jnp.asarray(batch["image_ids"]), jnp.asarray(batch["modality"]))
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(kk, (B, L, h, K)) for kk, h in zip(ks, (H, G, G, H)))
  mask = attention.dense_mask(seg, hor, seg)

  def run(f, *xs):
    out, vjp = jax.vjp(f, *xs)
    return (out,) + vjp(ct.astype(out.dtype))

  dense = jax.jit(lambda q, k, v: run(lambda q, k, v: attention._dense_attention(q, k, v, mask), q, k, v))
  ref = [np.asarray(x, np.float64) for x in dense(q, k, v)]
  for dtype in (jnp.float32, jnp.bfloat16):
    got = jax.jit(lambda q, k, v: run(lambda q, k, v: flash.flash_attention(q, k, v, seg, hor, interpret=SMOKE),
                                      q, k, v))(
        q.astype(dtype), k.astype(dtype), v.astype(dtype))
    rel = {name: float(np.linalg.norm(np.asarray(g, np.float64) - r) / np.linalg.norm(r))
           for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    emit(out_dir, {"kind": "parity", "dtype": jnp.dtype(dtype).name, "rel_err": rel,
                   "finite": bool(all(np.isfinite(np.asarray(g, np.float32)).all() for g in got))})


def attention_bench(out_dir):
  B, L, H, K = SHAPE
  ks = jax.random.split(jax.random.key(2), 4)
  q, k, v, ct = (jax.random.normal(kk, (B, L, H, K), jnp.bfloat16) for kk in ks)
  causal_flops = 4.0 * B * H * K * L * L / 2
  variants = {
      "flash_default": flash.BlockSizes(),
      "flash_q128_k128_w8": flash.BlockSizes(block_q=128, block_k=128, num_warps=8),
      "flash_q64_k64_s3": flash.BlockSizes(block_q=64, block_k=64, num_stages=3),
      "flash_bwd32": flash.BlockSizes(block_q_bwd=32, block_k_bwd=64, num_stages=3),
  }
  for mask_name, (seg, hor) in masks(B, L).items():
    visible = float(jnp.sum(attention.dense_mask(seg[:1], hor[:1], seg[:1]))) * B  # pairs, row 0 x B
    paths = {name: (lambda bs: lambda q, k, v: flash.flash_attention(q, k, v, seg, hor, block_sizes=bs,
                                                                     interpret=SMOKE))(bs)
             for name, bs in variants.items()}
    dense_mask = attention.dense_mask(seg, hor, seg)
    paths["dense_xla"] = lambda q, k, v: attention.dot_attention(q, k, v, dense_mask)
    if mask_name == "causal":
      paths["cudnn_causal"] = lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn")
    for name, f in paths.items():
      item = {"kind": "attention", "mask": mask_name, "path": name, "shape": [B, L, H, K],
              "visible_pairs_row0_x_B": visible}
      try:
        fwd = jax.jit(f)
        fwd_bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)
                                                           * ct.astype(jnp.float32)), argnums=(0, 1, 2)))
        t_f = timed(fwd, q, k, v)
        t_fb = timed(fwd_bwd, q, k, v)
        item.update(fwd_ms=round(t_f * 1e3, 3), fwd_bwd_ms=round(t_fb * 1e3, 3),
                    fwd_tflops_causal=round(causal_flops / t_f / 1e12, 1),
                    fwd_bwd_tflops_causal=round(3.5 * causal_flops / t_fb / 1e12, 1))
      except Exception as e:  # one failing path must not hide the others
        item["error"] = f"{type(e).__name__}: {str(e)[:400]}"
      emit(out_dir, item)


def step_bench(out_dir, specs, deadline):
  from tfx import dryrun
  import importlib.util
  spec_file = importlib.util.spec_from_file_location(
      "transfusion_exp", os.path.join(os.path.dirname(__file__), "..", "experiments", "transfusion.py"))
  exp = importlib.util.module_from_spec(spec_file)
  spec_file.loader.exec_module(exp)
  for spec in specs:
    if time.time() > deadline:
      emit(out_dir, {"kind": "step", "spec": spec, "skipped": "time budget spent"})
      continue
    size, batch, attn, remat, *seq = spec.split(":")
    config = exp.get_config(f"size={size}")
    if seq:
      config.seq_len = int(seq[0])
    config.global_batch_size = int(batch)
    config.model.attention = attn
    config.model.remat = remat
    item = {"kind": "step", "spec": spec}
    start = time.time()
    try:
      out = dryrun.report(config, None, time_steps=4)
      item.update({k: out.get(k) for k in ("params", "flops_per_token", "flops_per_step", "tokens_per_step",
                                           "measured", "seconds")})
      item["xla_total_gib"] = out["memory_per_device"].get("total_gib")
    except Exception as e:
      item["error"] = f"{type(e).__name__}: {str(e)[:600]}"
      traceback.print_exc()
    item["wall_s"] = round(time.time() - start, 1)
    emit(out_dir, item)
    jax.clear_caches()


def main():
  out_dir = sys.argv[1]
  os.makedirs(out_dir, exist_ok=True)
  opts = dict(a[2:].split("=", 1) for a in sys.argv[2:] if a.startswith("--") and "=" in a)
  budget = float(opts.get("budget_s", 420))
  skip = set(filter(None, opts.get("skip", "").split(",")))
  deadline = time.time() + budget
  emit(out_dir, {"kind": "device", "device": str(jax.devices()[0].device_kind), "jax": jax.__version__})
  for name, section in (("parity", parity), ("attention", attention_bench)):
    if name in skip:
      continue
    try:
      section(out_dir)
    except Exception as e:
      emit(out_dir, {"kind": name, "error": f"{type(e).__name__}: {str(e)[:600]}"})
      traceback.print_exc()
  specs = [s for s in opts.get("steps", "").split(";") if s]
  step_bench(out_dir, specs, deadline)


if __name__ == "__main__":
  main()
