"""The embedded default: a small Transfusion on the built-in shapes captions + Python docs text, on CPU.

  python -m tfx.train --config=experiments/shapes.py --workdir=/tmp/tfx_shapes
  python -m tfx.train --config=experiments/shapes.py:tiny --workdir=/tmp/tfx_tiny   # seconds; for tests

Sized for CPU: a prototype measured ~1.5 steps/s for a ~1M-param model at batch 64
on 2 cores, so this default finishes in well under an hour on a laptop.
"""
from tfx import config as tfx_config

ARGS = ("", "tiny")


def get_config(arg: str | None = None):
  """The default config; arg "tiny" shrinks everything for smoke tests."""
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"experiments/shapes.py: unknown argument {arg!r}; choose one of {ARGS}")
  c = tfx_config.default()
  c.total_steps = 3000
  c.global_batch_size = 32
  c.seq_len = 128                     # one caption + one 64-patch image fit with room to pack
  c.checkpoint_every_steps = 500
  c.log_every_steps = 25

  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 128, 4, 4, 4

  c.image.resolution = 32             # 32 px loses nothing for scoring the shapes spec
  c.image.patch_size = 4              # 4x4 pixel patches denoise; 8x8 (192 dims) did not learn

  # v-prediction: with eps on a cosine schedule the high-noise steps that decide
  # layout and colour carry almost no loss and the images ignored their captions.
  c.diffusion.prediction = "v"

  o = c.optim
  o.lr, o.warmup_steps, o.end_lr = 1e-3, 200, 5e-5
  o.ema_decay = 0.999                 # EMA weights sample cleaner images

  if arg == "tiny":
    c.total_steps = 4
    c.global_batch_size = 8
    c.seq_len = 96
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 32, 1, 2, 2
    c.image.resolution = 16
    m.t_embed_dim = 32
    c.optim.warmup_steps = 1
    c.optim.ema_decay = 0.9
  return c
