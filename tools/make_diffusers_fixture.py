"""Builds the small diffusers AutoencoderKL fixtures that tests/test_autoencoder.py checks parity against.

Run once, in a separate venv with torch + diffusers (never needed by tfx itself):
  python3 -m venv /tmp/venv_torch && /tmp/venv_torch/bin/pip install torch diffusers safetensors numpy
  /tmp/venv_torch/bin/python tools/make_diffusers_fixture.py [--out tests/fixtures]

Writes, per variant ("sd": quant convs; "flux": none, shift factor, three levels):
  OUT/diffusers_vae_<variant>/{config.json, diffusion_pytorch_model.safetensors}
  OUT/diffusers_vae_<variant>_io.npz: images (NHWC, [-1,1]), mean, logvar (NHWC), decoded (NHWC)
"""
import argparse
import pathlib

import numpy as np
import torch
from diffusers import AutoencoderKL

VARIANTS = {
    "sd": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
               scaling_factor=0.18215),
    "flux": dict(block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False),
}


def build(variant: str, seed: int) -> AutoencoderKL:
  """A random AutoencoderKL whose every parameter (norms and biases too) is perturbed."""
  torch.manual_seed(seed)
  kw = VARIANTS[variant]
  levels = len(kw["block_out_channels"])
  vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=16,
                      down_block_types=("DownEncoderBlock2D",) * levels,
                      up_block_types=("UpDecoderBlock2D",) * levels, **kw)
  with torch.no_grad():
    for p in vae.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return vae.eval()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/fixtures")
  out = pathlib.Path(parser.parse_args().out)
  for i, variant in enumerate(VARIANTS):
    vae = build(variant, seed=i)
    folder = out / f"diffusers_vae_{variant}"
    vae.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(i)
    images_NCHW = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
      dist = vae.encode(torch.from_numpy(images_NCHW)).latent_dist
      decoded = vae.decode(dist.mean).sample
    nhwc = lambda t: np.ascontiguousarray(np.asarray(t).transpose(0, 2, 3, 1), dtype=np.float32)
    np.savez_compressed(out / f"diffusers_vae_{variant}_io.npz", images=nhwc(images_NCHW),
                        mean=nhwc(dist.mean), logvar=nhwc(dist.logvar), decoded=nhwc(decoded))
    print(f"wrote {folder} ({sum(p.numel() for p in vae.parameters())} params)")


if __name__ == "__main__":
  main()
