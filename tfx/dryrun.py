"""The --dry_run report: params, FLOPs and per-device memory of the AOT-compiled train step.

Nothing is allocated: the model and train state are built with jax.eval_shape,
the step is lowered on abstract, sharded arguments and compiled for the mesh of
config.mesh. On a CPU machine the target mesh is simulated with
--xla_force_host_platform_device_count (see `simulate_cpu_devices`).

  python -m tfx.dryrun --config=experiments/transfusion.py:size=7B --num_devices=64

With --time_steps=N it then materializes the state on the real devices, runs the
compiled step N times on random records packed like the config's data mix
(`random_batch`) and adds the measured step time,
throughput, MFU and peak device memory (where the backend reports it).
"""
import json
import os
import sys
import time
from typing import Callable

import jax
import numpy as np

from tfx import mesh as mesh_lib
from tfx import optim, patching, record
from tfx import state as state_lib
from tfx import step as step_lib

GIB = 1024 ** 3
# Memory per device of the chips one would rent for the paper's runs.
DEVICE_MEMORY_GIB = {"H100 (80 GB)": 80e9 / GIB, "v5p (95 GB)": 95e9 / GIB}


class DryRunError(ValueError):
  """The dry run cannot be set up as asked (e.g. too few simulated devices)."""


def simulate_cpu_devices(n: int) -> None:
  """Makes this process see `n` CPU devices; must run before JAX starts its backends."""
  flag = f"--xla_force_host_platform_device_count={n}"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")


def _devices(num_devices: int | None) -> list:
  devices = jax.devices()
  if num_devices is None:
    return devices
  if num_devices > len(devices):
    raise DryRunError(f"dry run for {num_devices} devices, but JAX sees {len(devices)}; start it with "
                      f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} JAX_PLATFORMS=cpu")
  return devices[:num_devices]


def abstract_batch(config, mesh) -> dict:
  """ShapeDtypeStructs of one global batch (tfx/record.py fields), sharded like the trainer's."""
  p_dim = patching.patch_dim(config.image.patch_size, config.autoencoder.latent_channels)
  return {k: jax.ShapeDtypeStruct((config.global_batch_size,) + shape, record.FIELDS[k],
                                  sharding=mesh_lib.batch_sharding(mesh, 1 + len(shape)))
          for k, shape in record.field_shapes(config.seq_len, p_dim).items()}


def _data_parallel_size(mesh) -> int:
  """How many ways the batch is split: the mesh axes the rules give `act_batch`."""
  axes = mesh_lib.logical_to_spec(("act_batch",))[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in axes]))


def _memory(compiled) -> dict:
  """Per-device bytes of the compiled step, and whether it fits each chip."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  args, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
  alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
  total = args + out - alias + temp  # donated state: outputs reuse argument buffers
  gib = lambda b: round(b / GIB, 3)
  return {"arguments_gib": gib(args), "outputs_gib": gib(out), "aliased_gib": gib(alias),
          "temp_gib": gib(temp), "total_gib": gib(total),
          "fits": {chip: total / GIB <= cap for chip, cap in DEVICE_MEMORY_GIB.items()}}


def _flops(config, n_params: int) -> tuple[dict, Callable[[dict], float]]:
  """Training FLOPs from the model's own count (attention included) and the paper's 6*N*D, and
  the FLOPs a given batch needs (MFU's numerator: the LM head on text targets only)."""
  from tfx.model import flops
  tokens = config.global_batch_size * config.seq_len
  report = flops.report(config)
  per_token = float(report["flops_per_token"])
  model_flops = lambda batch: flops.model_flops(report, tokens, float(np.sum(batch["lm_mask"])),
                                                float(np.sum(batch["modality"] == record.IMAGE)))
  return ({"flops_per_token": per_token, "flops_per_step": per_token * tokens,
           "six_n_flops_per_step": 6.0 * n_params * tokens}, model_flops)


def random_batch(config, rng: np.random.Generator) -> dict:
  """One global batch of random records packed full as the data mix of `config` would be: text
  documents and caption-image pairs by config.data's shares, images capped per record."""
  p_dim = patching.patch_dim(config.image.patch_size, config.autoencoder.latent_channels)
  n = patching.num_patches(config.image.resolution // config.autoencoder.downsample,
                          config.image.patch_size)
  d = config.data
  share = d.image_text_weight / max(d.image_text_weight + d.text_weight, 1e-9)
  return record.packed_mix_batch(rng, config.global_batch_size, config.seq_len, n, p_dim,
                                 config.model.vocab_size, share, caption_first=d.caption_first_fraction,
                                 max_images=config.image.max_images_per_seq)


def _time_steps(config, compiled, factory, mesh, steps: int, model_flops: Callable[[dict], float]) -> dict:
  """Runs the compiled step `steps` times (after one warm-up) on random records: time and memory.

  Skipped, saying why, when XLA's estimate of the step's memory exceeds the device's.
  """
  from tfx import metrics
  need = _memory(compiled).get("total_gib")
  limit = (mesh.devices.flatten()[0].memory_stats() or {}).get("bytes_limit")
  if need and limit and need * GIB > limit:
    return {"skipped": f"the step needs {need} GiB per device by XLA's estimate; the device has "
                       f"{limit / GIB:.1f} GiB"}
  state = factory.init()
  batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.ndim))
           for k, v in random_batch(config, np.random.default_rng(config.seed)).items()}
  state, out = compiled(state, batch)
  jax.block_until_ready(out)
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    state, out = compiled(state, batch)
    jax.block_until_ready(out)
    seconds.append(time.perf_counter() - start)
  median = float(np.median(seconds))
  devices = mesh.devices.flatten()
  measured = {"steps": steps, "step_seconds_median": round(median, 4),
              "step_seconds_min": round(min(seconds), 4),
              "tokens_per_sec": round(config.global_batch_size * config.seq_len / median, 1),
              "loss": float(out["loss"])}
  peak = metrics.peak_flops(devices[0])
  if peak:
    measured["model_flops_per_step"] = model_flops(jax.device_get(batch))
    measured["mfu"] = round(measured["model_flops_per_step"] / median / (peak * len(devices)), 4)
  stats = devices[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    measured["peak_memory_gib_device0"] = round(stats["peak_bytes_in_use"] / GIB, 3)
  return measured


def report(config, num_devices: int | None = None, time_steps: int = 0) -> dict:
  """JSON-able dry-run report for `config` on `num_devices` (default: all) devices.

  `time_steps` > 0 also runs the step that many times on random records (see `_time_steps`).
  """
  from tfx.data import tokenizer
  from tfx.model import build_model, presets
  try:
    config = presets.resolve(config)
    tokenizer.model_vocab_size(config)  # an explicit size smaller than the tokenizer needs is an error
  except (ValueError, FileNotFoundError) as e:
    raise DryRunError(str(e)) from None
  devices = _devices(num_devices)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  dp = _data_parallel_size(mesh)
  if config.global_batch_size % dp:
    raise DryRunError(f"global_batch_size {config.global_batch_size} is not divisible by the "
                      f"{dp}-way data-parallel mesh {dict(mesh.shape)}")
  tx = optim.make_optimizer(config)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    factory = state_lib.StateFactory(config, tx, mesh, build_model)
    state = factory.abstract_with_shardings()
    batch = abstract_batch(config, mesh)
    step = step_lib.jit_train_step(step_lib.train_step_fn(config, factory.graphdef, tx),
                                   factory.shardings, {k: v.sharding for k, v in batch.items()}, config)
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    n_params = state_lib.num_params(state)
    flops, model_flops = _flops(config, n_params)
    measured = (_time_steps(config, compiled, factory, mesh, time_steps, model_flops)
                if time_steps > 0 else None)
  out = {
      "preset": config.model.preset,
      "params": n_params,
      **flops,
      "tokens_per_step": config.global_batch_size * config.seq_len,
      "memory_per_device": _memory(compiled),
      "mesh": {"shape": {k: int(v) for k, v in mesh.shape.items()}, "devices": len(devices),
               "device_kind": devices[0].device_kind,
               "dcn": dict(zip(mesh_lib.MESH_AXES, mesh_lib.dcn_shape(config.mesh)))},
      "sequences_per_device": config.global_batch_size / dp,
      "model": {"dtype": config.model.dtype, "remat": config.model.remat,
                "scan_layers": bool(config.model.scan_layers)},
      "seconds": {"lower": round(lowered_at - start, 2), "compile": round(compiled_at - lowered_at, 2)},
  }
  if measured:
    out["measured"] = measured
  return out


def main(argv=None) -> int:
  """`python -m tfx.dryrun --config=FILE[:ARG] [--num_devices=N]`: prints the report as JSON."""
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "experiment config file (get_config(arg))")
  flags.DEFINE_integer("num_devices", None, "simulate this many CPU devices (the target mesh)")
  flags.DEFINE_integer("time_steps", 0, "also run the step this many times on random records and time it")

  def run(_):
    cfg = flags.FLAGS.config
    if cfg is None:
      print("tfx.dryrun: --config=FILE is required", file=sys.stderr)
      return 2
    from tfx.model import presets
    try:
      presets.apply_overrides(cfg, config_flags.get_override_values(flags.FLAGS["config"]))
    except ValueError as e:
      print(f"tfx.dryrun: {e}", file=sys.stderr)
      return 2
    if flags.FLAGS.num_devices:
      simulate_cpu_devices(flags.FLAGS.num_devices)
    try:
      if flags.FLAGS.time_steps < 0:
        raise DryRunError(f"--time_steps must be >= 0, got {flags.FLAGS.time_steps}")
      out = report(cfg, flags.FLAGS.num_devices, flags.FLAGS.time_steps)
    except (DryRunError, mesh_lib.MeshError) as e:
      print(f"tfx.dryrun: {e}", file=sys.stderr)
      return 2
    print(json.dumps(out, indent=1))
    return 0

  def parse(args):
    try:
      return flags.FLAGS(args)
    except (flags.Error, AttributeError, KeyError) as e:
      lines = [line for line in str(e).splitlines() if line.strip()]
      print(f"tfx.dryrun: {lines[0] if lines else 'bad flags'}", file=sys.stderr)
      sys.exit(2)

  app.run(lambda a: sys.exit(run(a)), argv=argv, flags_parser=parse)
  return 0


if __name__ == "__main__":
  main()
