"""Named model sizes: the paper's five (Table 2) plus small CPU ones."""
import copy

# Paper sizes use the Llama 2 tokenizer's 32K vocabulary and Llama's SwiGLU widths
# (8/3 * d rounded up to 256; 11008 at 7B).
PRESETS: dict[str, dict] = {
    "0.16B": dict(n_layers=16, d_model=768, n_heads=12, n_kv_heads=12, mlp_dim=2048, vocab_size=32000),
    "0.37B": dict(n_layers=24, d_model=1024, n_heads=16, n_kv_heads=16, mlp_dim=2816, vocab_size=32000),
    "0.76B": dict(n_layers=24, d_model=1536, n_heads=24, n_kv_heads=24, mlp_dim=4096, vocab_size=32000),
    "1.4B": dict(n_layers=24, d_model=2048, n_heads=16, n_kv_heads=16, mlp_dim=5632, vocab_size=32000),
    "7B": dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, mlp_dim=11008, vocab_size=32000),
    # ~0.2M params: unit tests
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_dim=128, t_embed_dim=32,
                 unet_channels=(16, 32)),
    # ~3M params: the CPU default (the calibration prototype's d192 x 6 layers, 2.4 steps/s at batch 64
    # with 16 patches per image on 2 idle cores)
    "small": dict(n_layers=6, d_model=192, n_heads=6, n_kv_heads=6, mlp_dim=512, t_embed_dim=128),
}

PAPER_SIZES = {"0.16B": 0.16e9, "0.37B": 0.37e9, "0.76B": 0.76e9, "1.4B": 1.4e9, "7B": 7e9}


def resolve(config):
  """A copy of `config` with config.model.preset's sizes applied (unchanged copy if none)."""
  config = copy.deepcopy(config)
  name = config.model.preset
  if not name:
    return config
  if name not in PRESETS:
    raise ValueError(f"unknown model.preset {name!r}; choose one of {sorted(PRESETS)}")
  with config.unlocked():
    for key, value in PRESETS[name].items():
      setattr(config.model, key, value)
  return config
