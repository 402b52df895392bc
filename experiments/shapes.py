"""The embedded default: a small Transfusion on the built-in shapes captions + Python docs text, on CPU.

  python -m tfx.train --config=experiments/shapes.py --workdir=/tmp/tfx_shapes
  python -m tfx.train --config=experiments/shapes.py:tiny --workdir=/tmp/tfx_tiny   # seconds; for tests
  python -m tfx.train --config=experiments/shapes.py:long --workdir=/tmp/tfx_long   # ~2 hours

Sized for CPU: one step (32 records of 160 positions, ~62 caption-image pairs) runs at
1.65 steps/s on 2 idle cores (0.75 when they are shared), so 1500 steps plus building the
dataset (~40 s) take ~16 minutes, inside the 20-minute budget of the README's main command.
"""
from tfx import config as tfx_config

ARGS = ("", "tiny", "long")


def get_config(arg: str | None = None):
  """The default config; "tiny" shrinks everything for smoke tests, "long" trains 6x longer (~2 h)."""
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"experiments/shapes.py: unknown argument {arg!r}; choose one of {ARGS}")
  c = tfx_config.default()
  c.total_steps = 1500                # 1.65 steps/s on 2 idle cores: ~16 minutes with data prep
  c.global_batch_size = 32
  c.seq_len = 160                     # two caption + 64-patch image pairs (~77 positions each) fit
  c.checkpoint_every_steps = 500
  c.log_every_steps = 25
  c.sample_every_steps = 400          # WORKDIR/samples/ grids of config.sample_prompts (~15 s each)

  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 128, 4, 4, 4

  c.image.resolution = 32             # 32 px loses nothing for scoring the shapes spec
  c.image.patch_size = 4              # 4x4 pixel patches denoise; 8x8 (192 dims) did not learn

  # v-prediction: with eps on a cosine schedule the high-noise steps that decide
  # layout and colour carry almost no loss and the images ignored their captions.
  c.diffusion.prediction = "v"

  dt = c.data
  # The scores that matter here are images and captions: 90% of positions are
  # pairs (~62 pairs per step; the pydoc text keeps a perplexity to watch), and
  # half of the pairs are image-first, 2.5x the paper's share: captioning learned
  # slowest (48% exact in the prototype with 20%).
  dt.image_text_weight, dt.text_weight = 0.9, 0.1
  dt.caption_first_fraction = 0.5

  o = c.optim
  o.lr, o.warmup_steps, o.end_lr = 1e-3, 200, 5e-5
  o.ema_decay = 0.995                 # EMA weights sample cleaner images; 0.999 would still hold
                                      # 0.999**2000 = 13% of the random init after 2000 steps

  if arg == "long":
    c.total_steps *= 6
    c.checkpoint_every_steps = 1000
    o.warmup_steps = 500
    o.ema_decay = 0.999

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
