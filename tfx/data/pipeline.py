"""The Grain input pipeline: sources -> row slice -> shuffle/repeat -> examples -> mix+pack -> stack rows.

Mixture weights are shares of positions (text tokens + patches), as the paper's
1:1 text-to-image tokens; tfx.data.packing mixes and packs in one step, so text
fills the gaps image-caption pairs leave. Each source up to packing is a
MapDataset (random access, index-seeded randomness), so the iterator state is
small and exactly restorable; packing keeps the example each stream is in the
middle of as (parent state, offset). Row r of the global batch of B rows is its
own stream over the slice [r::B] of every source, and each host builds its
contiguous block of rows: hosts read disjoint data and the global batch does not
depend on the number of hosts (a 2-host run trains exactly like a 1-host run).
"""
import grain
import jax
from absl import flags
import numpy as np
from PIL import Image

from tfx import patching
from tfx.data import builders, builtin, examples, packing, tokenizer as tokenizer_lib


def _center_square(image: np.ndarray) -> np.ndarray:
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return image[top:top + s, left:left + s]


def pixels_to_model(image: np.ndarray, resolution: int) -> np.ndarray:
  """uint8 [H, W, 3] (any size) -> float32 [R, R, 3] in [-1, 1], center-cropped and resized."""
  image = _center_square(np.asarray(image))
  if image.shape[0] != resolution:
    resample = Image.Resampling.BOX if image.shape[0] > resolution else Image.Resampling.BICUBIC
    image = np.asarray(Image.fromarray(image).resize((resolution, resolution), resample))
  return image.astype(np.float32) / 127.5 - 1.0


class _ImageTextToExample:
  """A source record (caption + image or latent) -> a packed-ready example, randomly ordered."""

  def __init__(self, config, tok, has_latent: bool):
    self.tok = tok
    self.k = config.image.patch_size
    self.resolution = config.image.resolution
    self.use_latent = has_latent
    ae = config.autoencoder
    self.latent_side = config.image.resolution // ae.downsample
    self.latent_channels = ae.latent_channels
    self.shift, self.scale = ae.shift_factor, ae.scaling_factor
    d = config.data
    self.caption_first_fraction, self.caption_dropout = d.caption_first_fraction, d.caption_dropout
    self.max_caption_tokens = d.max_caption_tokens

  def grid(self, ex) -> np.ndarray:
    if not self.use_latent:
      return pixels_to_model(ex["image"], self.resolution)
    latent = np.asarray(ex["latent"], np.float32)
    want = (self.latent_side, self.latent_side, self.latent_channels)
    if latent.shape != want:
      raise ValueError(f"cached latent has shape {latent.shape}, config expects {want} "
                       "(image.resolution // autoencoder.downsample, autoencoder.latent_channels)")
    return (latent - self.shift) * self.scale

  def __call__(self, ex, rng: np.random.Generator):
    text = ex["caption"]
    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    ids = self.tok.encode(text)[:self.max_caption_tokens]
    caption_first = bool(rng.random() < self.caption_first_fraction)
    if caption_first and rng.random() < self.caption_dropout:
      ids = []
    return examples.image_text_example(ids, patching.patchify(self.grid(ex), self.k), self.tok,
                                       caption_first=caption_first)


class _TextToExample:
  def __init__(self, tok, patch_dim: int):
    self.tok, self.patch_dim = tok, patch_dim

  def __call__(self, ex):
    text = ex["text"]
    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    return examples.text_example(self.tok.encode(text), self.tok, self.patch_dim)


def _check_image_source(config, path: str) -> bool:
  """Whether the image-caption dataset at `path` is read as latents; errors on a mismatch."""
  names = builders.feature_names(path)
  pixels = config.autoencoder.kind == "pixels"
  if pixels and "image" not in names:
    raise ValueError(f"autoencoder.kind is 'pixels' but {path} holds no `image` feature "
                     f"(features: {sorted(names)})")
  if not pixels and "latent" not in names:
    raise ValueError(f"autoencoder.kind is {config.autoencoder.kind!r} but {path} holds pixels, not "
                     "`latent`: run the latent caching command first (python -m tfx.autoencoder.cache_latents "
                     "--config=... --output=DIR) and set data.image_text=DIR")
  return not pixels


def open_source(config, which: str, split: str) -> grain.MapDataset:
  """The whole "image_text" or "text" source of `split`, random access.

  A text source without the requested evaluation split (e.g. "test", "heldout")
  is read from its "validation" split.
  """
  name = config.data.image_text if which == "image_text" else config.data.text
  path = builtin.resolve(config, name)
  if which == "text" and split != "train" and split not in builders.split_names(path):
    split = "validation"
  return grain.MapDataset.source(builders.open_split(path, split))


def row_slice(source: grain.MapDataset, row: int, rows: int) -> grain.MapDataset:
  """What batch row `row` of `rows` reads: source[row::rows], or the whole source if it has fewer than `rows`."""
  return source[row::rows] if len(source) >= rows else source


# Rows read synchronously: one background thread (or worker process) prefetches whole
# batches, and Grain's default 16 threads x 500 elements per row stream would decode
# tens of thousands of examples before the first batch.
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class _StackRows(grain.IterDataset):
  """One record from each row stream, stacked into a batch [rows, ...]."""

  def __init__(self, rows: list):
    super().__init__(list(rows))

  def __iter__(self) -> "_StackRowsIterator":
    return _StackRowsIterator([row.__iter__() for row in self._parents])


class _StackRowsIterator(grain.DatasetIterator):
  def __init__(self, rows: list):
    super().__init__(rows)
    self._rows = rows

  def __next__(self) -> dict[str, np.ndarray]:
    records = [next(row) for row in self._rows]
    return {k: np.stack([r[k] for r in records]) for k in records[0]}

  def get_state(self) -> dict:
    return {"rows": [row.get_state() for row in self._rows]}

  def set_state(self, state: dict) -> None:
    for row, st in zip(self._rows, state["rows"]):
      row.set_state(st)


def make_dataset(config, *, split: str = "train", process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """This host's batches as a Grain IterDataset (see make_iterator)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if config.global_batch_size % process_count:
    raise ValueError(f"global_batch_size={config.global_batch_size} is not divisible by "
                     f"{process_count} hosts")
  d = config.data
  for key in ("caption_first_fraction", "caption_dropout"):
    if not 0.0 <= d[key] <= 1.0:
      raise ValueError(f"data.{key} must be in [0, 1], got {d[key]}")
  if d.image_text_weight < 0 or d.text_weight < 0:
    raise ValueError(f"data weights must be >= 0, got image_text_weight={d.image_text_weight} "
                     f"text_weight={d.text_weight}")
  tok = tokenizer_lib.load(config)
  tokenizer_lib.model_vocab_size(config, tok)  # raises if model.vocab_size is smaller than tok needs
  patch_dim = patching.patch_dim(config.image.patch_size, config.autoencoder.latent_channels)
  sources = {}
  if d.image_text and d.image_text_weight > 0:
    use_latent = _check_image_source(config, builtin.resolve(config, d.image_text))
    sources["image_text"] = (open_source(config, "image_text", split), d.image_text_weight)
  if d.text and d.text_weight > 0:
    sources["text"] = (open_source(config, "text", split), d.text_weight)
  if not sources:
    raise ValueError("no data: set data.image_text and/or data.text with a positive weight")
  # Row r of every global batch is its own packed stream over slice [r::B] of each
  # source; a host builds the streams of its contiguous block of rows. So the
  # global batch is the same for any number of hosts, and hosts read disjoint data.
  rows_per_host = config.global_batch_size // process_count
  first = process_index * rows_per_host
  rows = []
  for row in range(first, first + rows_per_host):
    seed = int(np.random.SeedSequence([config.seed, d.shuffle_buffer_seed, row]).generate_state(1)[0])
    parts, weights = [], []
    for which, (source, weight) in sources.items():
      ds = row_slice(source, row, config.global_batch_size)
      if which == "image_text":
        ds = ds.shuffle(seed=seed).repeat()
        ds = ds.random_map(_ImageTextToExample(config, tok, use_latent), seed=(seed + 1) % 2**32)
      else:
        ds = ds.shuffle(seed=(seed + 2) % 2**32).repeat().map(_TextToExample(tok, patch_dim))
      parts.append(ds.to_iter_dataset(_READ))
      weights.append(weight)
    rows.append(packing.MixPackIterDataset(parts, weights, seq_len=config.seq_len, pad_id=tok.pad_id,
                                           max_images=config.image.max_images_per_seq))
  batched = _StackRows(rows)
  if d.worker_count > 0:
    if not flags.FLAGS.is_parsed():   # Grain's workers read absl flags; outside an absl app use defaults
      flags.FLAGS.mark_as_parsed()
    batched = batched.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=d.worker_count, per_worker_buffer_size=max(d.prefetch, 1)))
  elif d.prefetch > 0:   # a background thread builds the next batches while the step runs
    batched = grain.experimental.ThreadPrefetchIterDataset(batched, prefetch_buffer_size=d.prefetch)
  return batched


def make_iterator(config, *, split: str = "train", process_index: int | None = None,
                  process_count: int | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator of this host's batches.

  Each batch is a dict of numpy arrays per tfx/record.py with leading shape
  [global_batch_size // process_count, seq_len]. Every split repeats forever
  (take as many batches as needed); the order depends only on config.seed.
  Built-in datasets and the default tokenizer are prepared on first use.
  """
  return iter(make_dataset(config, split=split, process_index=process_index, process_count=process_count))
