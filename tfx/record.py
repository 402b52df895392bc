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
