"""`python -m tfx.autoencoder.cache_latents --config=... --output=DIR`: encode an image dataset once.

Reads every split of config.data.image_text (pixels), prepares each image as the
Grain pipeline does (center crop, resize to config.image.resolution), encodes it
with the autoencoder of config.autoencoder, and writes a tfds array_record
dataset with the same features but `latent` (raw float32 [h, w, c], before
shift/scale) instead of `image`. Train on it with
--config.data.image_text=DIR and the same autoencoder.* settings. DIR may be a
URL (gs://, with the tfx[gcs] extra): the dataset is written locally, then uploaded.
A VQ tokenizer (autoencoder.kind "vq") stores `codes` (int32 [h, w]) instead of
`latent`: the token stream of model.image_mode "discrete".
"""
import numpy as np
import tensorflow_datasets as tfds

from tfx import autoencoder as autoencoder_lib
from tfx import fs
from tfx.autoencoder import AutoencoderError, cli, quality
from tfx.data import builders, builtin
from tfx.data.pipeline import pixels_to_model

PROG = "tfx.autoencoder.cache_latents"
_PASSTHROUGH = ("caption", "spec")  # text features copied as they are


class LatentCache(builders.ImageText, skip_registration=True):
  """An image-caption dataset of latents, stored in the order of its pixel source."""

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=self._features, description=self._description,
                                 disable_shuffling=True)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _encoded_examples(ae, source, resolution: int, split: str, batch_size: int, copied: tuple[str, ...]):
  """(key, example) pairs of one split, encoding `batch_size` images at a time."""
  def gen():
    for start in range(0, len(source), batch_size):
      rows = [source[i] for i in range(start, min(start + batch_size, len(source)))]
      images = np.stack([pixels_to_model(r["image"], resolution) for r in rows])
      latents = quality.batched(ae.encode, images, batch_size)  # padded: one compile
      name, dtype = ("codes", np.int32) if latents.ndim == 3 else ("latent", np.float32)
      for offset, (row, latent) in enumerate(zip(rows, latents.astype(dtype))):
        yield f"{split}-{start + offset:09d}", {name: latent, **{k: _text(row[k]) for k in copied}}
  return gen


def cache(config, output_dir: str, *, batch_size: int = 64) -> dict[str, int]:
  """Writes the latent dataset under output_dir (new or empty); returns examples per split."""
  if config.autoencoder.kind == "pixels":
    raise AutoencoderError("autoencoder.kind is 'pixels': there are no latents to cache; "
                           "set autoencoder.kind/path to a 'vae' or 'diffusers' autoencoder")
  if fs.exists(output_dir) and (not fs.isdir(output_dir) or fs.listdir(output_dir)):  # before encoding
    raise FileExistsError(f"output {output_dir} is not empty (or not a directory); refusing to overwrite it")
  source_dir = builtin.resolve(config, config.data.image_text)
  names = builders.feature_names(source_dir)
  if "image" not in names:
    raise AutoencoderError(f"{source_dir} holds no `image` feature (already latents?); cache a pixel dataset")
  ae = autoencoder_lib.load(config)
  side = ae.latent_side(config.image.resolution)
  copied = tuple(k for k in _PASSTHROUGH if k in names)
  splits = list(builders.dataset_info(source_dir).splits)
  sources = {s: builders.open_split(source_dir, s) for s in splits}
  shape = ({"codes_shape": (side, side)} if config.autoencoder.kind == "vq"
           else {"latent_shape": (side, side, ae.latent_channels)})
  features = builders.image_text_features(**shape, with_spec="spec" in copied)
  c = config.autoencoder
  description = (f"Latents of {source_dir} at {config.image.resolution} px by autoencoder kind={c.kind} "
                 f"path={c.path} (scaling_factor={ae.scaling_factor:g}, shift_factor={ae.shift_factor:g}).")
  with builders.new_dataset_dir(output_dir) as tmp:
    builders.write_dataset(
        LatentCache, tmp, features,
        {s: _encoded_examples(ae, src, config.image.resolution, s, batch_size, copied)
         for s, src in sources.items() if len(src)},
        description=description, compress=False)   # latents barely compress; see builders._uncompress
  return {s: len(src) for s, src in sources.items()}


def main(argv) -> None:
  config = cli.checked_config(PROG, argv, _CONFIG)
  if not _OUTPUT.value:
    cli.usage_error(PROG, "--output is required (a new or empty directory)")
  if _BATCH_SIZE.value < 1:
    cli.usage_error(PROG, f"--batch_size must be >= 1, got {_BATCH_SIZE.value}")
  try:
    counts = cache(config, _OUTPUT.value, batch_size=_BATCH_SIZE.value)
  except (AutoencoderError, FileExistsError, FileNotFoundError, ValueError) as e:
    cli.usage_error(PROG, str(e))
  per_split = ", ".join(f"{n} {s}" for s, n in counts.items())
  print(f"cached latents ({per_split}) in {_OUTPUT.value}; train with "
        f"--config.data.image_text={_OUTPUT.value} and the same autoencoder.* settings")


if __name__ == "__main__":
  from absl import app, flags

  _CONFIG = cli.define_config_flag()
  _OUTPUT = flags.DEFINE_string("output", None, "new (or empty) directory for the latent dataset")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "images encoded per call")
  app.run(main, flags_parser=cli.flags_parser(PROG))
