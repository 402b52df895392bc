"""The packed record format shared by the data pipeline, the losses and generation.

Every field has leading shape [L] (a batch is [B, L]); Grain packs and batches
all fields at once. Padding positions have segment_ids == 0 and contribute to
no loss.

  tokens        int32 [L]     text token id; PAD on image patches and padding
  patches       float32 [L,P] image patch vector (latent units); zeros elsewhere
  modality      int32 [L]     TEXT (0) or IMAGE (1)
  segment_ids   int32 [L]     1..S for the packed documents; 0 = padding
  positions     int32 [L]     position inside the segment (RoPE)
  image_ids     int32 [L]     0 on text; 1..M on the patches of the record's m-th image
  lm_targets    int32 [L]     the next token of the same segment (PAD where none)
  lm_mask       float32 [L]   1 where lm_targets is a text token to learn: the next
                              position is text in the same segment. So no loss on
                              the position after BOI's input, and EOI is inserted,
                              not predicted.
  noise_limited int32 [L]     1 on the patches of an image that precedes its caption
                              (its timestep is capped at diffusion.noise_limit)

An image is always `BOI, patch_1 .. patch_n, EOI` with its n patches contiguous,
in raster order, never split across records; every image of a run has the same n.
"""
import numpy as np

TEXT = 0
IMAGE = 1

FIELDS = {
    "tokens": np.int32,
    "patches": np.float32,
    "modality": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "image_ids": np.int32,
    "lm_targets": np.int32,
    "lm_mask": np.float32,
    "noise_limited": np.int32,
}


def field_shapes(seq_len: int, patch_dim: int) -> dict[str, tuple[int, ...]]:
  """Per-record shape of each field."""
  return {k: (seq_len, patch_dim) if k == "patches" else (seq_len,) for k in FIELDS}


def zeros(seq_len: int, patch_dim: int, batch: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
  """An all-padding record (or batch of records)."""
  return {k: np.zeros(batch + s, FIELDS[k]) for k, s in field_shapes(seq_len, patch_dim).items()}


def check(record: dict, seq_len: int, patch_dim: int) -> None:
  """Raises ValueError naming the first field whose key, dtype or trailing shape is wrong."""
  for k, shape in field_shapes(seq_len, patch_dim).items():
    if k not in record:
      raise ValueError(f"record is missing field {k!r}")
    a = record[k]
    if tuple(a.shape[-len(shape):]) != shape or a.dtype != FIELDS[k]:
      raise ValueError(f"record field {k!r}: expected [..., {shape}] {np.dtype(FIELDS[k])}, "
                       f"got {tuple(a.shape)} {a.dtype}")


def random_batch(rng: np.random.Generator, batch: int, seq_len: int, n: int, patch_dim: int,
                 vocab: int, max_images: int = 3, min_segments: int = 1, boi: int = 1, eoi: int = 2
                 ) -> dict[str, np.ndarray]:
  """Random records packed with segments of text runs and images (boi, n patches, eoi), at most
  max_images per record, as the packer guarantees (the U-Net has that many slots per row).

  Valid input for the model and losses at any size: the tests' batches.
  """
  out = zeros(seq_len, patch_dim, (batch,))
  for b in range(batch):
    items, seg, row_images = [], 0, 0
    while True:
      seg += 1
      fit = max(0, (seq_len - len(items) - 5) // (n + 5))  # images that still fit with some text
      n_img = int(rng.integers(0, min(max_images - row_images, fit) + 1))
      seg_items = []
      for _ in range(n_img):
        seg_items += [("text", int(rng.integers(3, vocab))) for _ in range(int(rng.integers(0, 4)))]
        limited = int(rng.integers(0, 2))
        seg_items += [("text", boi)] + [("image", limited)] * n + [("text", eoi)]
      seg_items += [("text", int(rng.integers(3, vocab))) for _ in range(int(rng.integers(1, 6)))]
      if len(items) + len(seg_items) > seq_len:
        break
      row_images += n_img
      items += [(seg, kind, v) for kind, v in seg_items]
      if seg >= min_segments and rng.random() < 0.3:
        break
    _fill_row(out, b, items, rng, patch_dim)
  return out


def packed_mix_batch(rng: np.random.Generator, batch: int, seq_len: int, n: int, patch_dim: int, vocab: int,
                     image_text_share: float, caption_tokens: int = 32, document_tokens: int = 1024,
                     caption_first: float = 0.8, max_images: int | None = None, boi: int = 1, eoi: int = 2
                     ) -> dict[str, np.ndarray]:
  """Full rows as the data packer makes them from a mix: each document is an image-caption pair
  (caption of `caption_tokens`, BOI, n patches, EOI; caption first with `caption_first`) with
  probability chosen so pairs take `image_text_share` of the positions, else a text document of
  up to `document_tokens`; documents are added until the row is full (the last text document
  is cut to fit, a pair that does not fit ends the row; past `max_images` only text is drawn).
  The dry run's timed records."""
  pair_len, text_len = caption_tokens + n + 2, (document_tokens + 1) / 2
  # P(pair) such that pairs' expected positions / all expected positions = image_text_share
  p_pair = image_text_share * text_len / (image_text_share * text_len + (1 - image_text_share) * pair_len)
  out = zeros(seq_len, patch_dim, (batch,))
  for b in range(batch):
    items, seg, row_images = [], 0, 0
    while len(items) < seq_len:
      seg += 1
      if rng.random() < p_pair and (max_images is None or row_images < max_images):
        row_images += 1
        caption = [("text", int(rng.integers(3, vocab))) for _ in range(caption_tokens)]
        limited = int(rng.random() >= caption_first)
        image = [("text", boi)] + [("image", limited)] * n + [("text", eoi)]
        doc = caption + image if not limited else image + caption
        if len(items) + len(doc) > seq_len:
          break
      else:
        doc = [("text", int(rng.integers(3, vocab))) for _ in range(int(rng.integers(1, document_tokens + 1)))]
        doc = doc[:seq_len - len(items)]
      items += [(seg, kind, v) for kind, v in doc]
    _fill_row(out, b, items, rng, patch_dim)
  return out


def _fill_row(out: dict, b: int, items: list, rng: np.random.Generator, patch_dim: int) -> None:
  """Writes row b of `out` from (segment, "text"|"image", token or noise_limited) items."""
  image_count, pos, prev_seg = 0, 0, 0
  for i, (seg_id, kind, v) in enumerate(items):
    pos = pos + 1 if seg_id == prev_seg else 0
    prev_seg = seg_id
    out["segment_ids"][b, i] = seg_id
    out["positions"][b, i] = pos
    if kind == "image":
      if i == 0 or items[i - 1][1] != "image":
        image_count += 1
      out["modality"][b, i] = IMAGE
      out["image_ids"][b, i] = image_count
      out["noise_limited"][b, i] = v
      out["patches"][b, i] = rng.normal(size=patch_dim)
    else:
      out["tokens"][b, i] = v
  for i in range(len(items) - 1):
    same = out["segment_ids"][b, i + 1] == out["segment_ids"][b, i]
    if same:
      out["lm_targets"][b, i] = out["tokens"][b, i + 1]
    text_pair = out["modality"][b, i] == TEXT and out["modality"][b, i + 1] == TEXT
    out["lm_mask"][b, i] = float(same and text_pair)
