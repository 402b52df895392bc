"""The jitted, donated train step: a pure function of (state, batch)."""
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tfx import optim
from tfx.state import TrainState


def step_rng(seed: int, step: jax.Array) -> jax.Array:
  """The step's PRNG key: a pure function of (seed, step), so resume is exact."""
  return jax.random.fold_in(jax.random.key(seed), step)


def default_loss_fn():
  from tfx import losses  # the model side lands separately; import at use
  return losses.transfusion_loss


def train_step_fn(config, graphdef, tx: optax.GradientTransformation,
                  loss_fn: Callable | None = None) -> Callable:
  """The pure step: merges the model inside, one optimizer update, EMA, metrics."""
  loss_fn = loss_fn or default_loss_fn()
  schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
  ema_decay = float(config.optim.ema_decay)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = step_rng(config.seed, state.step)

    def objective(params):
      model = nnx.merge(graphdef, params, state.rest)
      return loss_fn(model, batch, rng, config)

    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema is None else optim.ema_update(state.ema, params, ema_decay)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   lr=jnp.asarray(schedule(state.step), jnp.float32))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, state_shardings, batch_shardings) -> Callable:
  """jit with the state donated and sharded in and out as the rules say."""
  return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=0)
