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

_EXAMPLE_FIELDS = ("tokens", "patches", "modality", "image_ids", "noise_limited")


class RecordBuilder:
  """Accumulates example pieces into one record."""

  def __init__(self, seq_len: int, pad_id: int, max_images: int):
    self.seq_len, self.pad_id, self.max_images = seq_len, pad_id, max_images
    self.pieces: list[dict[str, np.ndarray]] = []
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
    stop = min(examples_lib.length(example), start + self.room)
    if stop > start:   # an empty example adds no (empty) segment
      piece = {k: example[k][start:stop] for k in _EXAMPLE_FIELDS}
      self.pieces.append(piece)
      self.used += stop - start
      self.images += int(piece["image_ids"].max())
    return stop - start

  def finish(self) -> dict[str, np.ndarray]:
    """The padded record."""
    if not self.pieces:
      raise ValueError("cannot finish an empty record")
    patch_dim = self.pieces[0]["patches"].shape[1]
    out = record.zeros(self.seq_len, patch_dim)
    out["tokens"][:] = self.pad_id
    out["lm_targets"][:] = self.pad_id
    pos, image_offset = 0, 0
    for seg, piece in enumerate(self.pieces, start=1):
      n = piece["tokens"].shape[0]
      s = slice(pos, pos + n)
      for k in ("tokens", "patches", "modality", "noise_limited"):
        out[k][s] = piece[k]
      ids = piece["image_ids"]
      out["image_ids"][s] = np.where(ids > 0, ids + image_offset, 0)
      image_offset += int(ids.max())
      out["segment_ids"][s] = seg
      out["positions"][s] = np.arange(n)
      pos += n
    seg, mod, tok = out["segment_ids"], out["modality"], out["tokens"]
    same_next = (seg[:-1] == seg[1:]) & (seg[:-1] != 0)
    out["lm_targets"][:-1] = np.where(same_next, tok[1:], self.pad_id)
    learn = same_next & (mod[:-1] == record.TEXT) & (mod[1:] == record.TEXT)
    out["lm_mask"][:-1] = learn.astype(np.float32)
    return out


def pack_one(example, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One example alone in a padded record (prompts for generation / evaluation)."""
  if examples_lib.length(example) > seq_len:
    raise ValueError(f"example of {examples_lib.length(example)} positions does not fit seq_len={seq_len}")
  b = RecordBuilder(seq_len, pad_id, max_images=max(examples_lib.num_images(example), 1))
  b.add(example)
  return b.finish()


class _Stream:
  """One example stream with the example it is in the middle of (held until fully packed)."""

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

  def _check(self, ex) -> None:
    if examples_lib.length(ex) > self._seq_len:
      raise ValueError(f"an image-caption example of {examples_lib.length(ex)} positions cannot fit "
                       f"seq_len={self._seq_len}; raise seq_len or lower data.max_caption_tokens")
    if examples_lib.num_images(ex) > self._max_images:
      raise ValueError(f"an example holds {examples_lib.num_images(ex)} images but "
                       f"image.max_images_per_seq={self._max_images}")

  def _place_one(self, b: RecordBuilder) -> bool:
    """Adds one piece from the stream most behind its share; False if nothing fits."""
    order = sorted(range(len(self._streams)), key=lambda i: (self._emitted[i] / self._weights[i], i))
    for i in order:
      stream = self._streams[i]
      ex = stream.peek()
      if ex is None:
        continue
      if bool(ex["splittable"]):
        n = b.add(ex, stream.offset)
      else:
        self._check(ex)
        if not b.fits_whole(ex):
          continue
        n = b.add(ex)
      stream.consumed(n)
      self._emitted[i] += n
      return True
    return False

  def __next__(self) -> dict[str, np.ndarray]:
    b = RecordBuilder(self._seq_len, self._pad_id, self._max_images)
    while b.room > 0 and self._place_one(b):
      pass
    if not b.pieces:
      raise StopIteration
    return b.finish()

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
