"""TrainState: step, params, optimizer state and optional EMA params, built sharded."""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfx import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes. `params`/`ema` are pure dicts of arrays.

  `rest` holds the model's non-Param variables (usually empty); it is rebuilt
  from the seed at start and never checkpointed.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any
  rest: Any

  def checkpoint_items(self) -> dict:
    """The parts saved to disk (rest is rebuilt from the config)."""
    items = {"step": self.step, "params": self.params, "opt_state": self.opt_state}
    if self.ema is not None:
      items["ema"] = self.ema
    return items

  def replace_from_checkpoint(self, items: dict) -> "TrainState":
    return self.replace(step=items["step"], params=items["params"], opt_state=items["opt_state"],
                        ema=items.get("ema", self.ema))


def _build(config, build_model):
  """The model split into (graphdef, Param state, all other state), built without eager sharding."""
  with nnx.use_eager_sharding(False):
    model = build_model(config, nnx.Rngs(config.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def _pure(state) -> dict:
  return nnx.to_pure_dict(state)


def _suffix_lookup(table: dict, path: tuple, default):
  for i in range(len(path)):
    if path[i:] in table:
      return table[path[i:]]
  return default


def _like_params(tree, param_shardings, replicated: NamedSharding):
  """Shardings for a tree whose leaves mirror params (optimizer moments, EMA)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(param_shardings)
  table = {tuple(p): s for p, s in flat}
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _suffix_lookup(table, tuple(path), replicated) if jnp.ndim(leaf) else replicated,
      tree)


class StateFactory:
  """Builds the abstract TrainState, its shardings on a mesh, and the sharded initial state."""

  def __init__(self, config, tx, mesh: Mesh, build_model: Callable):
    self.config, self.tx, self.mesh, self._build_model = config, tx, mesh, build_model
    graphdefs = []

    def abstract_split():
      graphdef, params, rest = _build(config, build_model)
      graphdefs.append(graphdef)  # static: safe to take out of the trace
      return params, rest

    abstract_params, _ = jax.eval_shape(abstract_split)
    self.graphdef = graphdefs[0]
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = _pure(mesh_lib.state_shardings(abstract_params, mesh))
    self.abstract = jax.eval_shape(self._init)
    self.shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=_like_params(self.abstract.opt_state, param_shardings, replicated),
        ema=None if self.abstract.ema is None else param_shardings,
        rest=jax.tree.map(lambda _: replicated, self.abstract.rest))

  def _init(self) -> TrainState:
    _, params, rest = _build(self.config, self._build_model)
    params = _pure(params)
    ema = params if self.config.optim.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      ema=ema, rest=_pure(rest))

  def init(self) -> TrainState:
    """The initial state, created directly in its sharded layout."""
    return jax.jit(self._init, out_shardings=self.shardings)()

  def init_rest(self) -> TrainState:
    """A state whose `rest` is built and whose other fields are placeholders for a restore."""
    rest = jax.jit(lambda: self._init().rest, out_shardings=self.shardings.rest)()
    return self.abstract.replace(rest=rest)

  def abstract_with_shardings(self) -> TrainState:
    """ShapeDtypeStructs carrying this mesh's shardings (a restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract, self.shardings)


def num_params(state: TrainState) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(state.params))
