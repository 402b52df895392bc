"""The VQ image tokenizer of the Chameleon baseline on the embedded shapes data: 32 px images <-> 8x8 codes.

  python -m tfx.train_autoencoder --config=experiments/shapes_vq.py --workdir=/tmp/shapes_vq
  python -m tfx.train_autoencoder --config=experiments/shapes_vq.py:tiny --workdir=/tmp/vq_tiny

The same encoder/decoder widths and training recipe as experiments/shapes_vae.py (f = 4),
with a 256-entry codebook of 8-dim vectors (EMA updates, dead-code restarts). autoencoder.json
then holds the test split's PSNR, scorer pass rates and code usage/perplexity. Not measured
at full length; at --config.autoencoder.train_steps=2000 (21 min on 2 shared cores): test PSNR
33.62 dB, all 256 codes used, perplexity 171.3 (docs/experiments.md, Chameleon).
"""
import importlib.util
import pathlib


def _shapes_vae():
  spec = importlib.util.spec_from_file_location("shapes_vae_experiment",
                                                pathlib.Path(__file__).with_name("shapes_vae.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"experiments/shapes_vq.py: unknown argument {arg!r} (expected '' or 'tiny')")
  c = _shapes_vae().get_config(arg)   # its widths, steps and recipe (f = 4), the tiny variant included
  ae = c.autoencoder
  ae.kind = "vq"
  ae.codebook_size = 16 if arg == "tiny" else 256   # 8x8 = 64 codes per 32 px image
  return c
