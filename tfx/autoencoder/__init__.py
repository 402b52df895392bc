"""Image <-> latent autoencoders: `load(config)` returns the one the config names.

Kinds: "pixels" (identity), "vae" (trained by `python -m tfx.train_autoencoder`),
"diffusers" (a pretrained diffusers AutoencoderKL folder), "vq" (the VQ tokenizer
`python -m tfx.train_autoencoder` trains with kind "vq": images <-> int codes, for
model.image_mode "discrete"). Shape-defining config
keys (latent_channels, downsample) and, for learned kinds, the latent scaling
(scaling_factor, shift_factor) must agree with what is loaded: the data pipeline
and the model read them from the config.
"""
import math

from tfx.autoencoder.base import Autoencoder, AutoencoderError
from tfx.autoencoder.pixels import PixelAutoencoder

KINDS = ("pixels", "vae", "diffusers", "vq")


def _check_fits(config, ae: Autoencoder) -> None:
  """Raises AutoencoderError naming the config keys that disagree with the loaded autoencoder."""
  c = config.autoencoder
  wanted = {"latent_channels": ae.latent_channels, "downsample": ae.downsample}
  if c.kind == "vq":
    wanted["codebook_size"] = ae.codebook_size
  elif c.kind != "pixels":
    wanted |= {"scaling_factor": ae.scaling_factor, "shift_factor": ae.shift_factor}
  wrong = {k: v for k, v in wanted.items() if not math.isclose(c[k], v, rel_tol=1e-4, abs_tol=1e-7)}
  if wrong:
    fix = " ".join(f"autoencoder.{k}={v!r}" for k, v in wrong.items())
    raise AutoencoderError(f"autoencoder {c.kind!r} at {c.path or '(none)'} does not match the config; set {fix}")


def describe(path: str) -> dict | None:
  """The config.autoencoder keys of the autoencoder stored at `path` (kind, latent_channels,
  downsample, scaling_factor, shift_factor), read from its metadata only: a tfx autoencoder.json,
  else a diffusers config.json (AutoencoderError if neither fits); None if `path` does not exist
  here (a dry run away from the data)."""
  from tfx import fs
  from tfx.autoencoder import diffusers, vae
  if not fs.exists(path):
    return None
  extra = {}
  if fs.exists(fs.join(path, vae.METADATA_FILE)):
    meta = vae.read_metadata(path)
    kind, net, scaling, shift = "vae", vae.net_config_from_meta(meta), meta["scaling_factor"], meta["shift_factor"]
    if meta.get("kind") == "vq":
      kind, extra = "vq", dict(codebook_size=int(meta["vq"]["codebook_size"]))
  else:
    kind, (net, scaling, shift) = "diffusers", diffusers.read_config(path)
  return dict(kind=kind, path=path, latent_channels=net.latent_channels, downsample=net.downsample,
              scaling_factor=float(scaling), shift_factor=float(shift), **extra)


def load(config) -> Autoencoder:
  """The autoencoder of `config.autoencoder` (kind, path), checked against the config's keys."""
  c = config.autoencoder
  if c.kind == "pixels":
    ae = PixelAutoencoder(c.scaling_factor, c.shift_factor)
  elif c.kind in ("vae", "diffusers", "vq"):
    if not c.path:
      raise AutoencoderError(f"autoencoder.kind={c.kind!r} needs autoencoder.path (a folder or URL)")
    if c.kind == "vae":
      from tfx.autoencoder import vae  # pulls in Orbax only when needed
      ae = vae.load(c.path)
    elif c.kind == "vq":
      from tfx.autoencoder import vq
      ae = vq.load(c.path)
    else:
      from tfx.autoencoder import diffusers
      ae = diffusers.load(c.path)
  else:
    raise AutoencoderError(f"autoencoder.kind={c.kind!r} is not one of {', '.join(KINDS)}")
  _check_fits(config, ae)
  return ae


__all__ = ["Autoencoder", "AutoencoderError", "KINDS", "PixelAutoencoder", "describe", "load"]
