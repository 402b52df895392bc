"""The training loop: data -> state -> restore -> step / log / save, until total_steps."""
import contextlib
import sys
import time
from typing import Callable

import jax
import numpy as np

from tfx import checkpoint as ckpt_lib
from tfx import diffusion
from tfx import lock as lock_lib
from tfx import loop
from tfx import mesh as mesh_lib
from tfx import metrics as metrics_lib
from tfx import optim
from tfx import profiler as profiler_lib
from tfx import state as state_lib
from tfx import step as step_lib
from tfx import workdir as workdir_lib


class ConfigError(ValueError):
  """Bad user input found before anything is compiled or written."""


def resolve(config, workdir=None):
  """The config as config.json records it: preset checked, vocabulary derived and checked
  against the tokenizer. A derived vocabulary (model.vocab_size 0) resuming WORKDIR keeps
  the saved run's size when the tokenizer fits in it, so a run saved with an explicit
  or differently padded size still resumes."""
  from tfx.data import tokenizer
  from tfx.model import presets
  try:
    if not config.model.vocab_size and workdir is not None:
      try:
        saved = workdir_lib.load_config(workdir).model.vocab_size
      except workdir_lib.NotAWorkdirError:
        saved = 0
      if saved and saved >= tokenizer.ids_needed(config):
        config = config.copy_and_resolve_references()
        with config.unlocked():
          config.model.vocab_size = saved
    config = presets.resolve(config)
    tokenizer.model_vocab_size(config)  # raises if an explicit size is smaller than the tokenizer needs
    return config
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None


def data_parallel_size(mesh) -> int:
  """How many ways the batch is split (every axis `act_batch` maps to)."""
  axes = mesh_lib.logical_to_spec(("act_batch",))[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in axes]))


def validate(config, workdir, allow_config_change=()) -> jax.sharding.Mesh:
  """Checks the config against the devices and the workdir (a resume may change only safe
  keys and those in `allow_config_change`); returns the mesh. Writes nothing."""
  for key in ("total_steps", "global_batch_size", "seq_len"):
    if config[key] <= 0:
      raise ConfigError(f"config.{key} must be positive, got {config[key]}")
  for key in ("checkpoint_every_steps", "log_every_steps", "stop_after_step", "profile_start_step",
              "profile_steps"):
    if config[key] < 0:
      raise ConfigError(f"config.{key} must be >= 0, got {config[key]}")
  mesh = mesh_lib.make_mesh(config.mesh)  # raises MeshError
  dp = data_parallel_size(mesh)
  if config.global_batch_size % dp:
    raise ConfigError(f"global_batch_size {config.global_batch_size} is not divisible by the "
                      f"data-parallel size {dp} (mesh data*fsdp = {dict(mesh.shape)})")
  if config.global_batch_size % jax.process_count():
    raise ConfigError(f"global_batch_size {config.global_batch_size} is not divisible by the "
                      f"{jax.process_count()} processes")
  accum = config.optim.grad_accum_steps
  if accum < 1:
    raise ConfigError(f"optim.grad_accum_steps must be >= 1, got {accum}")
  if config.global_batch_size % accum:
    raise ConfigError(f"global_batch_size {config.global_batch_size} is not divisible by "
                      f"optim.grad_accum_steps {accum}")
  if accum > 1 and (config.global_batch_size // accum) % dp:
    raise ConfigError(f"micro-batches of {config.global_batch_size // accum} rows (global_batch_size "
                      f"{config.global_batch_size} / optim.grad_accum_steps {accum}) are not divisible by "
                      f"the data-parallel size {dp} (mesh data*fsdp = {dict(mesh.shape)})")
  try:
    loop.FiniteGuard(config.optim.nan_policy, config.optim.max_skips_in_row)
    diffusion.check_cfg_interval(config.diffusion.cfg_interval)  # sample grids use it: refuse before training
    diffusion.check_clip_x0(config.diffusion.clip_x0)
    diffusion.check_best_of(config.diffusion.best_of)
    diffusion.check_timestep_sampling(config.diffusion.timestep_sampling)
    diffusion.check_timestep_density(config.diffusion)
    optim.check_lr_schedule(config.optim)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check_workdir_writable(workdir)
  try:
    workdir_lib.check_resumable(workdir, config)
    workdir_lib.check_config_change(workdir, config, allow_config_change)
  except workdir_lib.IncompatibleWorkdirError as e:
    raise ConfigError(str(e)) from None
  return mesh


def _check_workdir_writable(workdir) -> None:
  try:
    workdir_lib.check_writable(workdir)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def _global_batch(local: dict, shardings: dict) -> dict:
  """This host's numpy batch -> global jax arrays laid out as `shardings`."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local.items()}


def _step_flops(config) -> Callable[[dict], float] | None:
  """A step's training FLOPs from its metrics (text targets, images), or None without MFU."""
  if metrics_lib.peak_flops(jax.devices()[0]) is None:
    return None  # MFU is only reported where the device peak is known
  from tfx.model import flops
  try:
    report = flops.report(config)
  except RuntimeError as e:  # a missing MFU must not stop training
    print(f"tfx.train: no MFU: {e}", file=sys.stderr)
    return None
  return lambda m: flops.step_flops(config, report, m)


def _init_state(config, factory: state_lib.StateFactory) -> state_lib.TrainState:
  """A new run's state; with config.init_from, its params (and EMA) from that workdir's latest checkpoint."""
  if not config.init_from:
    return factory.init()
  from tfx import restore
  try:  # before the init compiles: a wrong workdir or model fails at once
    params = restore.init_params(config.init_from, factory.abstract_with_shardings().params)
  except ValueError as e:
    raise ConfigError(f"init_from: {e}") from None
  state = factory.init()
  ema = None if state.ema is None else jax.tree.map(lambda x: x.copy(), params)  # the step donates both
  return state.replace(params=params, ema=ema)


def _sampling_model(graphdef, state: state_lib.TrainState):
  """The model sampling uses: the EMA params when kept, else the params."""
  from flax import nnx
  return nnx.merge(graphdef, state.params if state.ema is None else state.ema, state.rest)


def run(config, workdir, *, allow_config_change=(), build_model: Callable | None = None,
        loss_fn: Callable | None = None, make_iterator: Callable | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last metrics.

  Process 0 holds WORKDIR's lock (tfx.lock) for the whole run; a busy workdir raises
  lock.WorkdirBusyError. A resume that changes config keys other than the safe ones
  raises ConfigError unless `allow_config_change` names them.

  build_model / loss_fn / make_iterator default to tfx.model.build_model,
  tfx.losses.transfusion_loss and tfx.data.pipeline.make_iterator.
  """
  if build_model is None:
    from tfx.model import build_model
    config = resolve(config, workdir)
  mesh = validate(config, workdir, allow_config_change)
  if make_iterator is None:
    from tfx.data.pipeline import make_iterator
  is_chief = jax.process_index() == 0
  reorder = workdir_lib.data_order_changed(workdir_lib.check_config_change(workdir, config, allow_config_change))
  lock = lock_lib.WorkdirLock(workdir, report=lambda m: print(f"tfx.train: {m}", file=sys.stderr))
  with lock if is_chief else contextlib.nullcontext():
    if is_chief:
      workdir_lib.save_config(workdir, config)
      if reorder:
        print(f"tfx.train: {', '.join(reorder)} changed: the data iterator starts afresh, not from "
              f"its saved position", file=sys.stderr)
    with jax.set_mesh(mesh):
      return _train(config, workdir, mesh, is_chief, build_model, loss_fn, make_iterator, not reorder)


def _train(config, workdir, mesh, is_chief, build_model, loss_fn, make_iterator, restore_data=True) -> dict:
  tx = optim.make_optimizer(config)
  factory = state_lib.StateFactory(config, tx, mesh, build_model)
  iterator = make_iterator(config, split="train", process_index=jax.process_index(),
                           process_count=jax.process_count())
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  target = factory.abstract_with_shardings().checkpoint_items()
  restored = checkpointer.restore_newest(  # a damaged newest checkpoint falls back to the one before
      lambda step: checkpointer.restore(step, target, iterator if restore_data else None),
      report=lambda m: print(f"tfx.train: {m}", file=sys.stderr) if is_chief else None,
      move_aside=is_chief)
  if restored is None:
    state = _init_state(config, factory)
    start = 0
    if config.init_from and is_chief:
      print(f"initialized the params from {config.init_from}", file=sys.stderr)
  else:
    start, items = restored
    state = factory.init_rest().replace_from_checkpoint(items)
    if is_chief:
      print(f"resumed from the checkpoint at step {start} in {workdir}", file=sys.stderr)
  stop = min(config.stop_after_step or config.total_steps, config.total_steps)
  if is_chief:
    print(f"training {state_lib.num_params(factory.abstract) / 1e6:.2f}M params on mesh "
          f"{dict(mesh.shape)}: steps {start} -> {stop} of {config.total_steps}, workdir {workdir}",
          file=sys.stderr)

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_chief)
  writer.drop_after(start)
  progress = metrics_lib.Progress(config.total_steps, enabled=is_chief)
  throughput = metrics_lib.Throughput(config.global_batch_size * config.seq_len,
                                      _step_flops(config), jax.device_count(), jax.devices()[0])
  delayed = metrics_lib.DelayedFetch()
  profiler = profiler_lib.StepProfiler(workdir, config.profile_start_step, config.profile_steps,
                                       enabled=is_chief)
  evaluator = None
  if config.eval_every_steps or config.sample_every_steps:
    from tfx.eval.evaluator import Evaluator  # sampling needs the tokenizer and autoencoder
    evaluator = Evaluator(config)
  guard = loop.FiniteGuard(config.optim.nan_policy, config.optim.max_skips_in_row)
  train_step = None
  last = {}
  waits = {}   # step -> seconds its next(iterator) took, until logged

  def handle(fetched):
    nonlocal last
    step, values = fetched
    guard.check(step, values)  # raises before any save of a state from (or after) a non-finite step
    values = {k: v for k, v in values.items() if k != "finite"}
    last = {"step": step, **values}
    if step % max(config.log_every_steps, 1) == 0 or step == stop or step == start + 1:
      # The first call only sets the clock: rates exclude the first step's compile.
      logged = [waits.pop(s) for s in sorted(waits) if s <= step]   # mean over the steps since the last log
      values = {**values, **throughput.update(step, values),
                "data_wait_s": float(np.mean(logged)) if logged else 0.0}
      if guard.policy == "skip":
        values["skipped_steps"] = float(guard.take_skipped())  # since the previous logged step
      writer.write(step, values)
      progress.report(step, values)

  try:
    with loop.sigterm_flag() as sigterm:
      for step in range(start, stop):
        t0 = time.perf_counter()
        local = next(iterator)
        waits[step + 1] = time.perf_counter() - t0
        if train_step is None:
          shardings = {k: mesh_lib.batch_sharding(mesh, np.ndim(v)) for k, v in local.items()}
          train_step = step_lib.jit_train_step(
              step_lib.train_step_fn(config, factory.graphdef, tx, loss_fn),
              factory.shardings, shardings, config)
        profiler.before(step)
        state, step_metrics = train_step(state, _global_batch(local, shardings))
        done = step + 1
        profiler.after(done, (state, step_metrics))
        fetched = delayed.push(done, step_metrics)
        if fetched:
          handle(fetched)
        stopping = loop.preempted(checkpointer, sigterm, done)
        every = config.checkpoint_every_steps
        if done == stop or stopping or (every and done % every == 0):
          fetched = delayed.flush()  # never save a state whose step went non-finite
          if fetched:
            handle(fetched)
          checkpointer.save(done, state.checkpoint_items(), iterator)
        if config.eval_every_steps and (done % config.eval_every_steps == 0 or done == stop):
          writer.write(done, evaluator.run(_sampling_model(factory.graphdef, state)))
        if config.sample_every_steps and (done % config.sample_every_steps == 0 or done == stop):
          writer.write_image(done, "text_to_image", evaluator.sample_grid(_sampling_model(factory.graphdef, state)))
        if stopping:
          if is_chief:
            print(f"preempted (SIGTERM): saved the checkpoint at step {done}; stopping", file=sys.stderr)
          break
      fetched = delayed.flush()
      if fetched:
        handle(fetched)
  finally:
    profiler.stop()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  if not last:
    previous = metrics_lib.read_metrics(workdir)
    last = previous[-1] if previous else {"step": start}
  return last
