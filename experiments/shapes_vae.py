"""The tfx KL-VAE for the embedded shapes data: 32 px images <-> 8x8x8 latents (f = 4).

  python -m tfx.train_autoencoder --config=experiments/shapes_vae.py --workdir=/tmp/shapes_vae
  python -m tfx.train_autoencoder --config=experiments/shapes_vae.py:tiny --workdir=/tmp/vae_tiny

The run prints the autoencoder.* overrides (path, scaling and shift factors) to
train a Transfusion model on its latents. "tiny" is a seconds-long smoke run.

Measured on the shared 2-core CPU (load average 5-25), batch 32, resumed in
segments 500 -> 1800 -> 2800 -> 4000 -> 5600 steps (each resume re-spreads the
cosine tail over the new total), ~100 min of training in all. Test split (1000
images at 32 px): PSNR 35.2 / 36.7 / 37.8 / 39.1 dB after 1800 / 2800 / 4000 /
5600 steps; shapes scorer pass rate on reconstructions 92.6 / 93.9 / 95.9 /
97.7% (originals 100%). Failures are small squares whose corners blur, which
then score as circles; latent scale 0.586, shift -0.075 at 5600 steps.
"""
from tfx import config as tfx_config


def get_config(arg: str = ""):
  c = tfx_config.default()
  ae = c.autoencoder
  ae.kind = "vae"
  ae.latent_channels = 8           # as the paper's VAE; 6x fewer numbers than the pixels
  ae.downsample = 4
  ae.vae_channels = (16, 32, 64)
  ae.vae_norm_groups = 8
  ae.train_steps = 5600            # the scorer passes >= 97% of the originals' rate only from ~5k steps
  c.image.patch_size = 2           # 8x8 latents -> 16 patches of 32 dims per image
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  if arg == "tiny":
    ae.vae_channels = (8, 8, 8)
    ae.vae_norm_groups = 4
    ae.train_steps = 4
    ae.train_batch_size = 8
    ae.eval_images = 16
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
  elif arg:
    raise ValueError(f"experiments/shapes_vae.py: unknown argument {arg!r} (expected '' or 'tiny')")
  return c
