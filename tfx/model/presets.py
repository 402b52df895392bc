"""Named model sizes: the paper's five (Table 2) plus small CPU ones.

`apply(config, name)` writes a preset's sizes into config.model and records its name in
model.preset; experiments call it in get_config, so --config.model.X flags (applied after
get_config) win. `resolve(config)` checks the name and derives model.vocab_size from the
tokenizer when it is 0; it never overwrites a size.
"""
import copy
from typing import Any, Mapping

# Llama's SwiGLU widths (8/3 * d rounded up to 256; 11008 at 7B). The vocabulary is the
# tokenizer's (model.vocab_size; the paper's is Llama 2's 32K), not a preset size.
PRESETS: dict[str, dict] = {
    "0.16B": dict(n_layers=16, d_model=768, n_heads=12, n_kv_heads=12, mlp_dim=2048),
    "0.37B": dict(n_layers=24, d_model=1024, n_heads=16, n_kv_heads=16, mlp_dim=2816),
    "0.76B": dict(n_layers=24, d_model=1536, n_heads=24, n_kv_heads=24, mlp_dim=4096),
    "1.4B": dict(n_layers=24, d_model=2048, n_heads=16, n_kv_heads=16, mlp_dim=5632),
    "7B": dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, mlp_dim=11008),
    # ~0.2M params: unit tests
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_dim=128, t_embed_dim=32,
                 unet_channels=(16, 32)),
    # ~3M params: the CPU default (the calibration prototype's d192 x 6 layers, 2.4 steps/s at batch 64
    # with 16 patches per image on 2 idle cores)
    "small": dict(n_layers=6, d_model=192, n_heads=6, n_kv_heads=6, mlp_dim=512, t_embed_dim=128),
}

PAPER_SIZES = {"0.16B": 0.16e9, "0.37B": 0.37e9, "0.76B": 0.76e9, "1.4B": 1.4e9, "7B": 7e9}


def _check(name: str) -> None:
  if name not in PRESETS:
    raise ValueError(f"unknown model.preset {name!r}; choose one of {sorted(PRESETS)}")


def apply(config, name: str):
  """Writes preset `name`'s sizes into config.model (in place) and sets model.preset; returns config."""
  _check(name)
  with config.unlocked():
    config.model.preset = name
    for key, value in PRESETS[name].items():
      config.model[key] = value
  return config


def apply_overrides(config, overrides: Mapping[str, Any]):
  """A command line's --config.model.preset=NAME: NAME's sizes under the line's other
  --config.model.* values (ml_collections sets the preset's name like any other string).
  `overrides` is config_flags.get_override_values(); returns config, changed in place."""
  if "model.preset" not in overrides or not config.model.preset:
    return config
  kept = {k: config.model[k] for k in PRESETS.get(config.model.preset, {}) if f"model.{k}" in overrides}
  apply(config, config.model.preset)
  with config.unlocked():
    config.model.update(kept)
  return config


def _unapplied(config) -> bool:
  """model.preset names a preset but config.model still holds tfx.config.default()'s value
  for every size where that preset differs: its name was set without apply()."""
  from tfx import config as config_lib
  default = config_lib.default().model
  differ = [k for k, v in PRESETS[config.model.preset].items() if v != default[k]]
  return all(config.model[k] == default[k] for k in differ)


def resolve(config):
  """A copy of `config` ready to build a model: model.preset checked, model.vocab_size derived
  from the tokenizer when 0 (tfx.data.tokenizer.model_vocab_size). Sizes stay as set: a
  preset is applied once, by apply(), before any override."""
  config = copy.deepcopy(config)
  name = config.model.preset
  if name:
    _check(name)
    if _unapplied(config):
      raise ValueError(f"model.preset is {name!r} but config.model holds none of its sizes: apply it with "
                       f"tfx.model.presets.apply(config, {name!r}) (experiments do, in get_config)")
  if not config.model.vocab_size:
    from tfx.data import tokenizer  # model sizes depend on the tokenizer only through this number
    with config.unlocked():
      config.model.vocab_size = tokenizer.model_vocab_size(config)
  return config
