"""A trained model for sampling and evaluation: WORKDIR/config.json + a checkpoint's params."""
from typing import Any

import jax
from flax import nnx

from tfx import checkpoint as ckpt_lib
from tfx import model as model_lib
from tfx import workdir as workdir_lib

# What restore_model raises for a workdir it cannot load from (the CLIs report it in one line).
RestoreError = (workdir_lib.NotAWorkdirError, ckpt_lib.NoCheckpointError)


def latest_step(workdir) -> int | None:
  """The newest finished checkpoint's step in WORKDIR, or None."""
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def restore_model(workdir, step: int | None = None, *, ema: bool = True) -> tuple[Any, nnx.Module]:
  """Loads WORKDIR/config.json and a checkpoint's params (EMA if saved and `ema`) into a model."""
  config = workdir_lib.load_config(workdir)
  ckpt = ckpt_lib.Checkpointer.open_existing(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
      have = ckpt.all_steps()
      raise ckpt_lib.NoCheckpointError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                                       f"{ckpt.directory} (available: {have or 'none'})")
    key = "ema" if ema and "ema" in ckpt.saved_keys(step) else "params"

    graphdefs = []

    def split():
      with nnx.use_eager_sharding(False):
        model = model_lib.build_model(config, nnx.Rngs(config.seed))
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      graphdefs.append(graphdef)
      return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    abstract_params, _ = jax.eval_shape(split)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params)
    params = ckpt.restore_subtree(step, {key: target})[key]
  finally:
    ckpt.close()
  rest = jax.jit(lambda: split()[1])()  # non-Param variables are rebuilt, not stored
  return config, nnx.merge(graphdefs[-1], params, rest)
