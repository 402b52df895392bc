"""Runs one sweep variant: train to each evaluation step, evaluate there, until total_steps.

The run lives in ROOT/<variant>; its evaluations are ROOT/<variant>/eval/<step>.json, as
`tfx.evaluate` writes them. Training stops at each evaluation step (config.stop_after_step,
which saves a checkpoint there) so that the checkpoint is evaluated before keep_checkpoints
can drop it, then resumes from it: a run that was stopped anywhere continues from its last
checkpoint, and a finished one (total_steps reached, every evaluation written) is skipped.
"""
import sys
from typing import Callable

from tfx import fs, restore
from tfx.eval import results, suite


def _log(msg: str) -> None:
  print(f"tfx.sweep: {msg}", file=sys.stderr, flush=True)


def eval_steps(config, requested: list[int] | None) -> list[int]:
  """The steps a variant is evaluated at: `requested` (those <= total_steps), else every
  checkpoint step of the run; total_steps always."""
  total = config.total_steps
  if requested:
    steps = {s for s in requested if 0 < s <= total}
  else:
    every = config.checkpoint_every_steps
    steps = set(range(every, total + 1, every)) if every else set()
  return sorted(steps | {total})


def eval_path(workdir: str, step: int) -> str:
  return fs.join(workdir, results.EVAL_SUBDIR, f"{step}.json")


def is_finished(workdir: str, config, steps: list[int]) -> bool:
  """total_steps reached and every evaluation written."""
  return (all(fs.exists(eval_path(workdir, s)) for s in steps)
          and max(restore.checkpoint_steps(workdir), default=None) == config.total_steps)


def evaluate(workdir: str, step: int, options: suite.Options, generators: dict | None = None) -> str:
  """tfx.eval.suite on WORKDIR's checkpoint at `step`; writes eval/<step>.json (+ grid, TensorBoard).

  `generators` (workdir -> Generator) keeps one run's compiled sampler across its steps."""
  from tfx import generate
  config, model = restore.restore_model(workdir, step)
  generators = {} if generators is None else generators
  if workdir in generators:
    generators[workdir].load_params(model)
  else:
    generators[workdir] = generate.Generator(config, model)
  result = suite.run(config, model, options, log=_log, generator=generators[workdir])
  return results.write(workdir, step, result, options)


def run_variant(config, workdir: str, steps: list[int], options: suite.Options, *,
                train: Callable | None = None) -> str:
  """Trains and evaluates one variant, resuming what is there; returns "skipped" or "ran"."""
  if fs.isdir(workdir) and is_finished(workdir, config, steps):
    return "skipped"
  if train is None:
    from tfx import trainer
    train = trainer.run
  generators = {}
  for step in steps:
    if fs.exists(eval_path(workdir, step)):
      continue
    have = restore.checkpoint_steps(workdir) if fs.isdir(workdir) else []
    if not have or have[-1] < step:
      segment = config.copy_and_resolve_references()
      segment.stop_after_step = 0 if step == config.total_steps else step
      _log(f"{workdir}: training to step {step} of {config.total_steps}")
      train(segment, workdir)
      have = restore.checkpoint_steps(workdir)
    if step not in have:  # the run went past `step` before this sweep, and its checkpoint is gone
      _log(f"{workdir}: no checkpoint at step {step} (kept: {have}); not evaluated there")
      continue
    _log(f"{workdir}: evaluating step {step}")
    evaluate(workdir, step, options, generators)
  return "ran"
