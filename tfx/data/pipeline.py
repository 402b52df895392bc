"""The Grain input pipeline: sources -> per-stream slice -> seeded order -> examples -> mix+pack -> batch.

Mixture weights are shares of positions (text tokens + patches), as the paper's
1:1 text-to-image tokens; tfx.data.packing mixes and packs, so text fills the
gaps image-caption pairs leave. The global batch of B rows is built by S
streams (config.data.streams; 0 = one per host, MaxText's layout), each packing
B/S consecutive rows from its own slice [s::S] of every source; a host builds
its S/H streams. So hosts read disjoint data, and the global batch depends on S,
not on the number of hosts H: a fixed S (a multiple of every H you will use)
makes a 2-host run train exactly like a 1-host run. Grain worker processes
(data.worker_count = W) each build whole batches from a further slice [w::W]
and take turns, so the batches depend on W too.

A stream's example i of a source is a pure function of (seed, i): a seeded
order per epoch over its slice, read and tokenized a chunk at a time. So a
stream's state is, per source, two ints (the example being packed, positions of
it already packed) plus the positions emitted: small JSON, exactly restorable.
"""
import dataclasses
from typing import Any, Callable

import grain
import jax
from absl import flags
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_parser

from tfx import image_codes, patching
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


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _ImageTextToExamples:
  """Source records (caption + image or latent) -> compact examples, in random caption order."""

  def __init__(self, config, tok, has_latent: bool):
    self.tok = tok
    # discrete images (tfx/image_codes.py): the cached codes become tokens past the text vocabulary
    self.code_offset = image_codes.code_offset(config, tok) if image_codes.is_discrete(config) else None
    self.patch_dim = patching.patch_dim(config.image.patch_size, config.autoencoder.latent_channels)
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

  def patches(self, ex) -> np.ndarray:
    """[n, P] patches of the record's image (pixels) or scaled latent."""
    if not self.use_latent:
      return patching.patchify(pixels_to_model(ex["image"], self.resolution), self.k)
    latent = np.asarray(ex["latent"], np.float32)
    want = (self.latent_side, self.latent_side, self.latent_channels)
    if latent.shape != want:
      raise ValueError(f"cached latent has shape {latent.shape}, config expects {want} "
                       "(image.resolution // autoencoder.downsample, autoencoder.latent_channels)")
    # (latent - shift) * scale, written straight in patch order: one new array, not three
    side, k, c = self.latent_side // self.k, self.k, self.latent_channels
    grid = latent.reshape(side, k, side, k, c).transpose(0, 2, 1, 3, 4)
    out = np.empty((side, side, k, k, c), np.float32)
    if self.shift:   # x - 0.0 is x (bit for bit), so a zero shift skips a pass
      np.subtract(grid, self.shift, out=out)
      out *= self.scale
    else:
      np.multiply(grid, self.scale, out=out)
    return out.reshape(side * side, k * k * c)

  def codes(self, ex) -> np.ndarray:
    """[h*w] token ids of the record's cached VQ codes, in raster order."""
    codes = np.asarray(ex["codes"], np.int32)
    if codes.shape != (self.latent_side, self.latent_side):
      raise ValueError(f"cached codes have shape {codes.shape}, config expects {(self.latent_side,) * 2} "
                       "(image.resolution // autoencoder.downsample)")
    return codes.reshape(-1) + self.code_offset

  def __call__(self, records: list, rng: np.random.Generator) -> list[dict]:
    u = rng.random((len(records), 2))
    out = []
    for ex, (u_first, u_drop) in zip(records, u):
      ids = self.tok.encode(_text(ex["caption"]))[:self.max_caption_tokens]
      caption_first = bool(u_first < self.caption_first_fraction)
      if caption_first and u_drop < self.caption_dropout:
        ids = []
      if self.code_offset is not None:
        out.append(examples.code_image_text_example(ids, self.codes(ex), self.tok, self.patch_dim,
                                                    caption_first=caption_first, compact=True))
        continue
      out.append(examples.image_text_example(ids, self.patches(ex), self.tok, caption_first=caption_first,
                                             compact=True))
    return out


class _EditToExamples:
  """Edit records (source image, instruction, target image) -> compact edit examples.

  With probability data.caption_dropout the condition (source and instruction) is
  dropped, leaving `BOS BOI target EOI EOS`: the unconditional branch of guidance.
  """

  def __init__(self, config, tok):
    self.tok, self.k, self.resolution = tok, config.image.patch_size, config.image.resolution
    self.dropout, self.max_tokens = config.data.caption_dropout, config.data.max_caption_tokens

  def __call__(self, records: list, rng: np.random.Generator) -> list[dict]:
    u = rng.random(len(records))
    out = []
    for ex, u_drop in zip(records, u):
      target = patching.patchify(pixels_to_model(ex["target_image"], self.resolution), self.k)
      if u_drop < self.dropout:
        out.append(examples.image_text_example([], target, self.tok, compact=True))
        continue
      source = patching.patchify(pixels_to_model(ex["source_image"], self.resolution), self.k)
      ids = self.tok.encode(_text(ex["instruction"]))[:self.max_tokens]
      out.append(examples.edit_example(source, ids, target, self.tok, compact=True))
    return out


class _TextToExamples:
  def __init__(self, tok, patch_dim: int):
    self.tok, self.patch_dim = tok, patch_dim

  def __call__(self, records: list, rng: np.random.Generator) -> list[dict]:
    del rng
    return [examples.text_example(self.tok.encode(_text(ex["text"])), self.tok, self.patch_dim, compact=True)
            for ex in records]


def _check_image_source(config, path: str) -> bool:
  """Whether the image-caption dataset at `path` is read as latents; errors on a mismatch."""
  names = builders.feature_names(path)
  pixels = config.autoencoder.kind == "pixels"
  if image_codes.is_discrete(config):
    if "codes" not in names:
      raise ValueError(f"model.image_mode is 'discrete' but {path} holds no `codes`: cache the images with the "
                       "VQ tokenizer first (python -m tfx.autoencoder.cache_latents --config=... --output=DIR, "
                       "autoencoder.kind='vq') and set data.image_text=DIR")
    return True
  if "instruction" in names:   # an edit dataset (shapes_edit) holds pixels only
    if not pixels:
      raise ValueError(f"{path} is an edit dataset of pixels; it needs autoencoder.kind 'pixels', not "
                       f"{config.autoencoder.kind!r}")
    return False
  if pixels and "image" not in names:
    raise ValueError(f"autoencoder.kind is 'pixels' but {path} holds no `image` feature "
                     f"(features: {sorted(names)})")
  if "codes" in names:
    raise ValueError(f"{path} holds VQ codes: train on it with model.image_mode='discrete'")
  if not pixels and "latent" not in names:
    raise ValueError(f"autoencoder.kind is {config.autoencoder.kind!r} but {path} holds pixels, not "
                     "`latent`: run the latent caching command first (python -m tfx.autoencoder.cache_latents "
                     "--config=... --output=DIR) and set data.image_text=DIR")
  return not pixels


def open_source(config, which: str, split: str):
  """The whole "image_text" or "text" source of `split`: random access (len, [i]).

  A text source without the requested evaluation split (e.g. "test", "heldout")
  is read from its "validation" split.
  """
  name = config.data.image_text if which == "image_text" else config.data.text
  path = builtin.resolve(config, name)
  if which == "text" and split != "train" and split not in builders.split_names(path):
    split = "validation"
  return builders.open_split(path, split)


_FLOAT_KINDS = {np.dtype(np.float32), np.dtype(np.float64)}
_INT_KINDS = {np.dtype(np.int32), np.dtype(np.int64)}


def record_reader(source) -> Callable[[int], dict]:
  """`source[i]` as a function; for a split (tfx.data.builders.Split) of Text and static-shape numeric
  Tensor features (every tfx dataset but pixel images), a lean decoder of the same values.

  Measured at the paper shape: tfds' generic decoding took 66 us of a 32 KB latent record's
  ~110 us read, this decoder 11 us (proto parse + one numpy copy per feature). Any other
  source or feature type reads through tfds.
  """
  features, raw = getattr(source, "features", None), getattr(source, "raw", None)
  if features is None or raw is None:
    return source.__getitem__
  specs = {}
  for name, f in features.items():
    if type(f) is tfds.features.Text:
      specs[name] = "text"
    elif (type(f) is tfds.features.Tensor and f._encoding == tfds.features.Encoding.NONE
          and None not in f.shape and np.dtype(f.np_dtype) in _FLOAT_KINDS | _INT_KINDS):
      specs[name] = (np.dtype(f.np_dtype), tuple(f.shape))
    else:
      return source.__getitem__
  parse = example_parser.tf_example_pb2.Example.FromString

  def read(i: int) -> dict:
    feature = parse(raw(i)).features.feature
    out = {}
    for name, spec in specs.items():
      f = feature[name]
      if spec == "text":
        out[name] = f.bytes_list.value[0]
      else:
        dtype, shape = spec
        values = f.float_list.value if dtype in _FLOAT_KINDS else f.int64_list.value
        out[name] = np.asarray(values, dtype).reshape(shape)
    return out

  return read


def slice_positions(size: int, part: int, parts: int) -> range:
  """The source positions part `part` of `parts` reads: [part::parts], or all of them if the source is smaller."""
  return range(part, size, parts) if size >= parts else range(size)


# Orders of up to this many examples are numpy permutations (8 bytes each, ~1 us per
# example); larger slices use Grain's index_shuffle (no memory; ~25 us per example at
# 500k, measured here, but 150 us at 500 and 1.2 ms at 62: too slow for small slices).
_PERMUTATION_MAX = 1 << 22
# Examples read and made at once (one rng per chunk). Reads go one record at a time:
# array_record's batched __getitems__ starts threads per call and was 20% slower here.
_CHUNK = 64


class _IndexedStream:
  """Examples 0, 1, 2, ... of one source slice in a seeded order per epoch, repeated forever.

  Example i is a pure function of (seed, i); the state is the example being
  packed and the positions of it already packed.
  """

  def __init__(self, source, positions: range, make: Callable, seed: int):
    if not len(positions):
      raise ValueError("a data source is empty")
    self.read, self.positions, self.make, self.seed = record_reader(source), positions, make, seed
    self.index, self.offset = 0, 0
    self._chunk_id, self._chunk = None, None
    self._epoch, self._order = None, None
    n = len(positions)
    self._shuffle = None if n <= _PERMUTATION_MAX else grain.MapDataset.range(n).shuffle(seed=seed % 2**32)

  def _source_index(self, i: int) -> int:
    n = len(self.positions)
    if self._shuffle is not None:
      return self.positions[self._shuffle[i] % n]
    epoch, j = divmod(i, n)
    if epoch != self._epoch:
      self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(n)
    return self.positions[int(self._order[j])]

  def peek(self) -> dict:
    c, j = divmod(self.index, _CHUNK)
    if c != self._chunk_id:
      indices = [self._source_index(i) for i in range(c * _CHUNK, (c + 1) * _CHUNK)]
      records = [self.read(i) for i in indices]
      self._chunk_id, self._chunk = c, self.make(records, np.random.default_rng([self.seed, 1 << 40, c]))
    return self._chunk[j]

  def consumed(self, n: int) -> None:
    self.offset += n
    if self.offset >= examples.length(self.peek()):
      self.index, self.offset = self.index + 1, 0

  def get_state(self) -> list[int]:
    return [self.index, self.offset]

  def set_state(self, state) -> None:
    self.index, self.offset = int(state[0]), int(state[1])


@dataclasses.dataclass
class _Part:
  """One source as a stream reads it."""
  source: Any
  make: Callable
  weight: float
  salt: int   # tells the sources' seeds apart


class _HostBatches(grain.IterDataset):
  """This host's rows of each global batch: `streams` (global stream ids) of `rows` rows each."""

  def __init__(self, parts: list[_Part], *, streams: range, num_streams: int, rows: int, seq_len: int,
               pad_id: int, max_images: int, patch_dim: int, seed: int):
    super().__init__([])
    self.parts, self.streams, self.num_streams, self.rows = parts, streams, num_streams, rows
    self.seq_len, self.pad_id, self.max_images, self.patch_dim, self.seed = (
        seq_len, pad_id, max_images, patch_dim, seed)
    self.worker, self.workers = 0, 1

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Grain worker `sl.start` of `sl.step` reads its own slice of every stream's data."""
    del sequential_slice
    self.worker, self.workers = sl.start or 0, sl.step or 1

  def __iter__(self) -> "_HostBatchesIterator":
    return _HostBatchesIterator(self)


class _HostBatchesIterator(grain.DatasetIterator):
  def __init__(self, ds: _HostBatches):
    super().__init__()
    self._ds = ds
    self._streams, self._emitted = [], []
    every = ds.num_streams * ds.workers
    for s in ds.streams:
      part_index = s + ds.num_streams * ds.worker   # stream s of worker w reads [s + S*w :: S*W]
      self._streams.append([
          _IndexedStream(p.source, slice_positions(len(p.source), part_index, every), p.make,
                         int(np.random.SeedSequence([ds.seed, s, ds.worker, p.salt]).generate_state(1)[0]))
          for p in ds.parts])
      self._emitted.append([0] * len(ds.parts))
    self._weights = [float(p.weight) for p in ds.parts]

  def __next__(self) -> dict[str, np.ndarray]:
    ds, records = self._ds, []
    for streams, emitted in zip(self._streams, self._emitted):
      for _ in range(ds.rows):
        b = packing.RecordBuilder(ds.seq_len, ds.max_images)
        while b.room > 0 and packing.place_one(b, streams, emitted, self._weights):
          pass
        records.append(b.pieces)
    return packing.write_records(records, ds.seq_len, ds.patch_dim, ds.pad_id)

  def get_state(self) -> dict:
    return {"streams": [{"sources": [s.get_state() for s in streams], "emitted": list(emitted)}
                        for streams, emitted in zip(self._streams, self._emitted)]}

  def set_state(self, state: dict) -> None:
    for streams, emitted, st in zip(self._streams, self._emitted, state["streams"]):
      for stream, source_state in zip(streams, st["sources"]):
        stream.set_state(source_state)
      emitted[:] = [int(e) for e in st["emitted"]]


def num_streams(config, process_count: int) -> int:
  """S, the packed streams of a global batch (config.data.streams, 0 = one per host); checked."""
  s = config.data.streams or process_count
  if s < 0 or s % process_count:
    raise ValueError(f"data.streams={config.data.streams} must be 0 or a positive multiple of the "
                     f"{process_count} hosts")
  if config.global_batch_size % s:
    raise ValueError(f"global_batch_size={config.global_batch_size} is not divisible by {s} data streams "
                     "(data.streams, 0 = one per host)")
  return s


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
  parts = []
  if d.image_text and d.image_text_weight > 0:
    path = builtin.resolve(config, d.image_text)
    use_latent = _check_image_source(config, path)
    make = (_EditToExamples(config, tok) if "instruction" in builders.feature_names(path)
            else _ImageTextToExamples(config, tok, use_latent))
    parts.append(_Part(open_source(config, "image_text", split), make, d.image_text_weight, salt=0))
  if d.text and d.text_weight > 0:
    parts.append(_Part(open_source(config, "text", split), _TextToExamples(tok, patch_dim), d.text_weight, salt=1))
  if not parts:
    raise ValueError("no data: set data.image_text and/or data.text with a positive weight")
  streams = num_streams(config, process_count)
  per_host = streams // process_count
  batched = _HostBatches(
      parts, streams=range(process_index * per_host, (process_index + 1) * per_host), num_streams=streams,
      rows=config.global_batch_size // streams, seq_len=config.seq_len, pad_id=tok.pad_id,
      max_images=config.image.max_images_per_seq, patch_dim=patch_dim,
      seed=int(np.random.SeedSequence([config.seed, d.shuffle_buffer_seed]).generate_state(1)[0]))
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
  (take as many batches as needed); the order depends on config.seed, the
  number of streams (data.streams, 0 = one per host) and data.worker_count.
  Built-in datasets and the default tokenizer are prepared on first use.
  """
  return iter(make_dataset(config, split=split, process_index=process_index, process_count=process_count))
