"""The Transfusion model: `build_model(config, rngs)`; presets, FLOPs report, attention/cache protocol."""
from flax import nnx

from tfx.model import presets
from tfx.model.attention import KVCache
from tfx.model.transfusion import Transfusion


def build_model(config, rngs: nnx.Rngs) -> Transfusion:
  """Builds the model for the full config (config.model.preset applied first)."""
  return Transfusion(presets.resolve(config), rngs=rngs)


__all__ = ["build_model", "presets", "KVCache", "Transfusion"]
