"""The jitted, donated train step: a pure function of (state, batch)."""
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tfx import compile_options, loop, losses, mesh, optim
from tfx.state import TrainState


def step_rng(seed: int, step: jax.Array) -> jax.Array:
  """The step's PRNG key: a pure function of (seed, step), so resume is exact."""
  return jax.random.fold_in(jax.random.key(seed), step)


def split_micro_batches(x, n: int):
  """[B, ...] -> [n, B/n, ...] with row r in micro-batch r % n.

  The batch is sharded in contiguous blocks of rows per device; taking every n-th row
  (reshape [B/n, n] then swap) gives each micro-batch an equal share of every device's
  rows, so the micro-batch axis needs no resharding (given B/n divides by the
  data-parallel size, which trainer.validate checks).
  """
  B = x.shape[0]
  if B % n:
    raise ValueError(f"batch of {B} rows is not divisible by optim.grad_accum_steps={n}")
  x = x.reshape(B // n, n, *x.shape[1:]).swapaxes(0, 1)
  return mesh.constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))


def train_step_fn(config, graphdef, tx: optax.GradientTransformation,
                  loss_fn: Callable | None = None) -> Callable:
  """The pure step: merges the model inside, one optimizer update, EMA, metrics.

  With optim.grad_accum_steps = N > 1 the batch runs as N micro-batches of B/N rows in
  a lax.scan that sums fp32 gradients and metrics. The diffusion noise is drawn once for
  the whole batch and sliced, and the loss is normalized by the whole batch's text-token
  and image counts (losses.accumulation_inputs; loss_fn then gets noise= and totals=),
  so the micro-batch losses and gradients sum to the whole batch's: the same update and
  metrics as one step at batch B, holding the activations of B/N rows at a time.

  metrics["finite"] (1.0 / 0.0) says the loss, the gradients and the *new* params and optimizer
  state are all finite; with optim.nan_policy "skip" a step that is not keeps its old state.
  """
  loss_fn = loss_fn or losses.transfusion_loss
  schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
  ema_decay = float(config.optim.ema_decay)
  accum = int(config.optim.grad_accum_steps)
  skip = config.optim.nan_policy == "skip"

  def grads_and_metrics(state: TrainState, batch: dict, rng):
    def value_and_grad(params, batch, **kw):
      def objective(params):
        return loss_fn(nnx.merge(graphdef, params, state.rest), batch, rng, config, **kw)
      (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
      return grads, metrics

    if accum == 1:
      return value_and_grad(state.params, batch)
    (t_BL, eps_BLP), totals = losses.accumulation_inputs(batch, rng, config)
    micro = {k: split_micro_batches(v, accum) for k, v in dict(batch, _t=t_BL, _eps=eps_BLP).items()}

    def micro_step(mb):
      noise = (mb["_t"], mb["_eps"])
      mb = {k: v for k, v in mb.items() if k not in ("_t", "_eps")}
      return value_and_grad(state.params, mb, noise=noise, totals=totals)

    def body(carry, mb):
      return jax.tree.map(jnp.add, carry, micro_step(mb)), None

    shapes = jax.eval_shape(micro_step, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)  # fp32 accumulators
    return jax.lax.scan(body, zeros, micro)[0]

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = step_rng(config.seed, state.step)
    grads, metrics = grads_and_metrics(state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema is None else optim.ema_update(state.ema, params, ema_decay)
    grad_norm = optax.tree.norm(grads)
    # after the update too: a finite loss and gradient can still give non-finite params or moments
    finite = loop.all_finite((metrics["loss"], grad_norm, params, opt_state))
    if skip:
      params, opt_state, ema = loop.keep_if_finite(finite, (params, opt_state, ema),
                                                   (state.params, state.opt_state, state.ema))
    metrics = dict(metrics, grad_norm=grad_norm, lr=jnp.asarray(schedule(state.step), jnp.float32),
                   finite=finite.astype(jnp.float32))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, state_shardings, batch_shardings, config) -> Callable:
  """jit with the state donated and sharded in and out as the rules say, compiled with the
  XLA options `config` asks for (tfx/compile_options.py)."""
  return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=0,
                 compiler_options=compile_options.train_step(config))
