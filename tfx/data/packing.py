"""Packing examples (tfx.data.examples) into fixed-length records (tfx/record.py).

Next-fit packing: examples fill one record in order. A text document may be cut
at the record end (its rest opens the next record as a new segment); an
image-caption pair is never cut: if it does not fit, or the record already
holds max_images images, the record is closed and the pair opens the next one.
Every token and patch of the input appears in the output exactly once.
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
    piece = {k: example[k][start:stop] for k in _EXAMPLE_FIELDS}
    self.pieces.append(piece)
    self.used += stop - start
    self.images += int(piece["image_ids"].max()) if stop > start else 0
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
      image_offset += int(ids.max()) if n else 0
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


class _PackIterator(grain.DatasetIterator):
  """State: the parent's state before the example being packed, and how much of it is used."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, max_images: int):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._max_images = seq_len, pad_id, max_images
    self._pending = None
    self._pending_state = None
    self._offset = 0

  def _read(self) -> bool:
    self._pending_state = copy.deepcopy(self._parent.get_state())
    try:
      self._pending = next(self._parent)
    except StopIteration:
      self._pending = None
      return False
    self._offset = 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    b = RecordBuilder(self._seq_len, self._pad_id, self._max_images)
    while b.room > 0:
      if self._pending is None and not self._read():
        if b.pieces:
          return b.finish()
        raise StopIteration
      ex = self._pending
      if bool(ex["splittable"]):
        self._offset += b.add(ex, self._offset)
        if self._offset >= examples_lib.length(ex):
          self._pending = None
        continue
      if examples_lib.length(ex) > self._seq_len:
        raise ValueError(f"an image-caption example of {examples_lib.length(ex)} positions cannot fit "
                         f"seq_len={self._seq_len}; raise seq_len or lower data.max_caption_tokens")
      if examples_lib.num_images(ex) > self._max_images:
        raise ValueError(f"an example holds {examples_lib.num_images(ex)} images but "
                         f"image.max_images_per_seq={self._max_images}")
      if not b.fits_whole(ex):
        return b.finish()
      b.add(ex)
      self._pending = None
    return b.finish()

  def get_state(self) -> dict:
    if self._pending is None:
      return {"parent": self._parent.get_state(), "pending": False, "offset": 0}
    return {"parent": copy.deepcopy(self._pending_state), "pending": True, "offset": self._offset}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._pending = None
    if state["pending"]:
      if not self._read():
        raise ValueError("packing state points past the end of its input")
      self._offset = int(state["offset"])


class PackIterDataset(grain.IterDataset):
  """Packs an IterDataset of examples into records of `seq_len` positions."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int, max_images: int):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._max_images = seq_len, pad_id, max_images

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._max_images)


def pack_examples(examples: list, *, seq_len: int, pad_id: int, max_images: int) -> list[dict]:
  """All records from a list of examples (the iterator above, run to the end)."""
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  return list(PackIterDataset(ds, seq_len=seq_len, pad_id=pad_id, max_images=max_images))
