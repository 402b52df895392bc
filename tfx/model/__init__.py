"""The Transfusion model.

  build_model(config, rngs) -> Transfusion         config = full tfx config (presets.resolve'd)
  model(batch, t_BL, *, cache=None) -> (logits_BLV, patch_out_BLP, new_cache)
  model.features(batch, t_BL) -> (h_BLD, patch_out_BLP, new_cache); model.logits(h_BLD) -> logits
  model.init_cache(batch_size, max_len) -> KVCache  protocol in tfx/model/attention.py
  presets.apply(config, name), presets.resolve(config), flops.report(config)
"""
from flax import nnx

from tfx.model import presets
from tfx.model.attention import KVCache
from tfx.model.transfusion import Transfusion


def build_model(config, rngs: nnx.Rngs) -> Transfusion:
  """Builds the model for the full config (vocabulary derived by presets.resolve when 0)."""
  return Transfusion(presets.resolve(config), rngs=rngs)


__all__ = ["build_model", "presets", "KVCache", "Transfusion"]
