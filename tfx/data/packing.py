"""Packing and mixing examples (tfx.data.examples) into fixed-length records (tfx/record.py).

Records are filled from one or more example streams. The next piece always
comes from the stream furthest below its share of positions (weights), so the
output honours the mixture in tokens + patches. A text document may be cut at
the record end (its rest opens the next record as a new segment); an
image-caption pair is never cut: if it does not fit, or the record already holds
max_images images, the gap is filled from a splittable (text) stream if there
is one, and the pair waits for the next record. Every token and patch of the
input appears in the output exactly once, each stream in its own order.
"""
import copy

import grain
import numpy as np

from tfx import record
from tfx.data import examples as examples_lib


class RecordBuilder:
  """Decides which example pieces fill one record (lengths only; `write_records` copies the data)."""

  def __init__(self, seq_len: int, max_images: int):
    self.seq_len, self.max_images = seq_len, max_images
    self.pieces: list[tuple[dict, int, int]] = []   # (example, start, stop)
    self.used = 0
    self.images = 0

  @property
  def room(self) -> int:
    return self.seq_len - self.used

  def fits_whole(self, example) -> bool:
    return (examples_lib.length(example) <= self.room
            and self.images + examples_lib.num_images(example) <= self.max_images)

  def add(self, example, start: int = 0) -> int:
    """Adds example[start:] (as much as fits); returns how many positions were taken."""
    length = examples_lib.length(example)
    stop = min(length, start + self.room)
    if stop > start:   # an empty example adds no (empty) segment
      self.pieces.append((example, start, stop))
      self.used += stop - start
      self.images += _images_in(example, start, stop, length)
    return stop - start


def _images_in(example, start: int, stop: int, length: int) -> int:
  """Images (highest image id) in example[start:stop]."""
  if "num_images" in example and (not example["num_images"] or (start, stop) == (0, length)):
    return int(example["num_images"])
  return int(example["image_ids"][start:stop].max())


def _patch_rows(example, start: int, stop: int):
  """(positions of example[start:stop] that are image patches, their patch vectors [k, P])."""
  if "patches" in example:
    where = np.flatnonzero(example["modality"][start:stop] == record.IMAGE)
    return where, example["patches"][start + where]
  patches = example["image_patches"]
  if not len(patches):
    return None, None
  is_image = example["modality"] == record.IMAGE
  where = np.flatnonzero(is_image[start:stop])
  before = int(np.count_nonzero(is_image[:start]))
  return where, patches[before:before + len(where)]


def write_records(records: list[list[tuple[dict, int, int]]], seq_len: int, patch_dim: int,
                  pad_id: int) -> dict[str, np.ndarray]:
  """Pieces (example, start, stop) of each record -> a padded batch [len(records), seq_len] (tfx/record.py).

  Each piece is written in place into the preallocated batch (slices, no per-record concatenation
  or repeat): the writer was ~15% of the pipeline's time at the paper shape.
  """
  out = record.zeros(seq_len, patch_dim, (len(records),))
  tokens, modality, noise, segment_ids, positions, image_ids, patches = (
      out[k] for k in ("tokens", "modality", "noise_limited", "segment_ids", "positions", "image_ids", "patches"))
  tokens[:] = pad_id
  arange = np.arange(seq_len, dtype=np.int32)
  for row, pieces in enumerate(records):
    s, image_offset = 0, 0
    for segment, (ex, a, b) in enumerate(pieces, 1):
      e = s + b - a
      tokens[row, s:e] = ex["tokens"][a:b]
      segment_ids[row, s:e] = segment
      positions[row, s:e] = arange[:b - a]
      images = _images_in(ex, a, b, examples_lib.length(ex))
      # a compact text example (no image patches) is all text: its modality and noise_limited are zeros
      if "patches" in ex or len(ex["image_patches"]):
        modality[row, s:e] = ex["modality"][a:b]
        noise[row, s:e] = ex["noise_limited"][a:b]
      if images:   # image ids count on through the record; patches go to image positions only
        ids = ex["image_ids"][a:b]
        image_ids[row, s:e] = np.where(ids > 0, ids + image_offset, 0)
        if "patch_start" in ex and (a, b) == (0, examples_lib.length(ex)):   # a whole compact pair: one run
          first = s + int(ex["patch_start"])
          patches[row, first:first + len(ex["image_patches"])] = ex["image_patches"]
        else:
          where, vectors = _patch_rows(ex, a, b)
          patches[row, s + where] = vectors
        image_offset += images
      s = e
  same_next = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] != 0)
  out["lm_targets"][:] = pad_id
  out["lm_targets"][:, :-1] = np.where(same_next, tokens[:, 1:], pad_id)
  learn = same_next & (modality[:, :-1] == record.TEXT) & (modality[:, 1:] == record.TEXT)
  out["lm_mask"][:, :-1] = learn
  return out


def _patch_dim(example) -> int:
  return example["patches" if "patches" in example else "image_patches"].shape[-1]


def finish(builder: RecordBuilder, pad_id: int) -> dict[str, np.ndarray]:
  """The one padded record of `builder`."""
  if not builder.pieces:
    raise ValueError("cannot finish an empty record")
  batch = write_records([builder.pieces], builder.seq_len, _patch_dim(builder.pieces[0][0]), pad_id)
  return {k: v[0] for k, v in batch.items()}


def check_example(ex, seq_len: int, max_images: int) -> None:
  """Raises if an unsplittable example can never fit a record."""
  if examples_lib.length(ex) > seq_len:
    raise ValueError(f"an image-caption example of {examples_lib.length(ex)} positions cannot fit "
                     f"seq_len={seq_len}; raise seq_len or lower data.max_caption_tokens")
  if examples_lib.num_images(ex) > max_images:
    raise ValueError(f"an example holds {examples_lib.num_images(ex)} images but "
                     f"image.max_images_per_seq={max_images}")


def place_one(b: RecordBuilder, streams: list, emitted: list[int], weights: list[float]) -> bool:
  """Adds one piece from the stream most behind its share of positions; False if nothing fits.

  A stream has peek() (its current example, or None when exhausted), `offset`
  (positions of it already packed) and consumed(n).
  """
  order = sorted(range(len(streams)), key=lambda i: (emitted[i] / weights[i], i))
  for i in order:
    stream = streams[i]
    ex = stream.peek()
    if ex is None:
      continue
    if bool(ex["splittable"]):
      n = b.add(ex, stream.offset)
    else:
      check_example(ex, b.seq_len, b.max_images)
      if not b.fits_whole(ex):
        continue
      n = b.add(ex)
    stream.consumed(n)
    emitted[i] += n
    return True
  return False


def pack_one(example, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One example alone in a padded record (prompts for generation / evaluation)."""
  if examples_lib.length(example) > seq_len:
    raise ValueError(f"example of {examples_lib.length(example)} positions does not fit seq_len={seq_len}")
  b = RecordBuilder(seq_len, max_images=max(examples_lib.num_images(example), 1))
  b.add(example)
  return finish(b, pad_id)


class _Stream:
  """One example stream of any Grain iterator, with the example it is in the middle of.

  Generic, so it keeps a copy of the iterator's state before each example; the
  training pipeline's streams (tfx.data.pipeline) are indexed and keep two ints.
  """

  def __init__(self, it: grain.DatasetIterator):
    self.it = it
    self.pending = None
    self.state_before = None   # the iterator's state before `pending` was read
    self.offset = 0            # positions of `pending` already packed
    self.done = False

  def peek(self):
    if self.pending is None and not self.done:
      self.state_before = copy.deepcopy(self.it.get_state())
      try:
        self.pending, self.offset = next(self.it), 0
      except StopIteration:
        self.done = True
    return self.pending

  def consumed(self, n: int) -> None:
    self.offset += n
    if self.offset >= examples_lib.length(self.pending):
      self.pending = None

  def get_state(self) -> dict:
    if self.pending is None:
      return {"parent": self.it.get_state(), "pending": False, "offset": 0}
    return {"parent": copy.deepcopy(self.state_before), "pending": True, "offset": self.offset}

  def set_state(self, state: dict) -> None:
    self.it.set_state(state["parent"])
    self.pending, self.done = None, False
    if state["pending"]:
      if self.peek() is None:
        raise ValueError("packing state points past the end of its input")
      self.offset = int(state["offset"])


class _MixPackIterator(grain.DatasetIterator):
  """State: per stream (state before its pending example, offset into it) and positions emitted."""

  def __init__(self, parents: list, weights: list[float], seq_len: int, pad_id: int, max_images: int):
    super().__init__(parents)
    self._streams = [_Stream(p) for p in parents]
    self._weights = [float(w) for w in weights]
    self._emitted = [0] * len(parents)
    self._seq_len, self._pad_id, self._max_images = seq_len, pad_id, max_images

  def __next__(self) -> dict[str, np.ndarray]:
    b = RecordBuilder(self._seq_len, self._max_images)
    while b.room > 0 and place_one(b, self._streams, self._emitted, self._weights):
      pass
    if not b.pieces:
      raise StopIteration
    return finish(b, self._pad_id)

  def get_state(self) -> dict:
    return {"streams": [s.get_state() for s in self._streams], "emitted": list(self._emitted)}

  def set_state(self, state: dict) -> None:
    for stream, st in zip(self._streams, state["streams"]):
      stream.set_state(st)
    self._emitted = [int(e) for e in state["emitted"]]


class MixPackIterDataset(grain.IterDataset):
  """Mixes IterDatasets of examples by position shares `weights` and packs them into records."""

  def __init__(self, parents: list, weights: list[float], *, seq_len: int, pad_id: int, max_images: int):
    if len(parents) != len(weights) or not parents or min(weights) <= 0:
      raise ValueError(f"need one positive weight per stream, got {weights} for {len(parents)} streams")
    super().__init__(list(parents))
    self._weights = list(weights)
    self._seq_len, self._pad_id, self._max_images = seq_len, pad_id, max_images

  def __iter__(self) -> _MixPackIterator:
    return _MixPackIterator([p.__iter__() for p in self._parents], self._weights, self._seq_len,
                            self._pad_id, self._max_images)


def pack_examples(examples: list, *, seq_len: int, pad_id: int, max_images: int) -> list[dict]:
  """All records from one list of examples, packed in order (the iterator above, run to the end)."""
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  return list(MixPackIterDataset([ds], [1.0], seq_len=seq_len, pad_id=pad_id, max_images=max_images))
