"""The Chameleon baseline of experiments/shapes.py: the same data, model sizes, optimizer and steps,
with images as VQ code tokens predicted by the LM loss (model.image_mode="discrete").

  python -m tfx.train_autoencoder --config=experiments/shapes_vq.py --workdir=/tmp/shapes_vq
  python -m tfx.autoencoder.cache_latents --config=experiments/chameleon.py \
      --config.autoencoder.path=/tmp/shapes_vq --output=/tmp/shapes_codes
  python -m tfx.train --config=experiments/chameleon.py --config.autoencoder.path=/tmp/shapes_vq \
      --config.data.image_text=/tmp/shapes_codes --workdir=/tmp/tfx_chameleon

The cache step reads the pixels of data.image_text (the built-in shapes), so it runs before
data.image_text points at the cache. An image is BOI + 64 codes + EOI (the continuous model's
is BOI + 16 patches + EOI), so a record of seq_len 160 holds fewer pairs. The patch and
diffusion keys of shapes.py do nothing here. Measured against shapes.py at 7200 steps, its
count before the U-Net fold (with the even mix of scene kinds), in docs/experiments.md
(Chameleon section; add --config.total_steps=7200 '--config.data.shapes_kind_weights=(1,1,1)'
to train that run again).
"""
import importlib.util
import pathlib

ARGS = ("", "tiny", "long")


def _shapes():
  spec = importlib.util.spec_from_file_location("shapes_experiment", pathlib.Path(__file__).with_name("shapes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"experiments/chameleon.py: unknown argument {arg!r}; choose one of {ARGS}")
  c = _shapes().get_config(arg)
  c.model.image_mode = "discrete"
  ae = c.autoencoder
  # experiments/shapes_vq.py's tokenizer (":tiny" pairs with shapes_vq.py:tiny)
  ae.kind, ae.latent_channels, ae.downsample = "vq", 8, 4
  ae.codebook_size = 16 if arg == "tiny" else 256
  c.image.patch_size = 1             # unused by discrete images; any divisor of the 8x8 code grid
  # Guidance on the code logits, at the scale it was measured with; discrete images have no
  # timesteps, so shapes.py's interval of noise levels does not apply.
  c.diffusion.cfg_scale, c.diffusion.cfg_interval = 3.0, (0.0, 1.0)
  c.diffusion.best_of = 1            # measured with one draw per prompt (shapes.py's: best of 8)
  return c
