"""Prompts as record fields on the host: joining pieces, numbering their images, left-padding a batch."""
import numpy as np

from tfx import record

PROMPT_FIELDS = ("tokens", "patches", "modality", "image_ids")
BUCKET = 16  # prompt lengths are padded up to a multiple of this, so compiles are reused


def bucket(length: int) -> int:
  return -(-length // BUCKET) * BUCKET


def concat_pieces(pieces: list[dict]) -> dict[str, np.ndarray]:
  """Joins example pieces (tfx.data.examples fields) and numbers their images 1..M in order."""
  out = {k: np.concatenate([p[k] for p in pieces]) for k in PROMPT_FIELDS}
  image_ids, m, prev = np.zeros_like(out["image_ids"]), 0, 0
  for i, is_image in enumerate(out["modality"] == record.IMAGE):
    m += bool(is_image and not prev)
    image_ids[i] = m if is_image else 0
    prev = is_image
  out["image_ids"] = image_ids
  return out


def left_pad(prompts: list[dict], length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Stacks prompts right-aligned in [B, length] (segment 0 before them); returns (batch, lengths_B)."""
  return _stack(prompts, length, right_aligned=True)


def right_pad(prompts: list[dict], length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Stacks prompts left-aligned in [B, length] (segment 0 after them), so each starts at slot 0
  whatever its batch-mates; returns (batch, lengths_B)."""
  return _stack(prompts, length, right_aligned=False)


def _stack(prompts: list[dict], length: int, right_aligned: bool):
  B, P = len(prompts), prompts[0]["patches"].shape[-1]
  batch = {k: np.zeros((B, length) + ((P,) if k == "patches" else ()), record.FIELDS[k])
           for k in PROMPT_FIELDS + ("segment_ids", "positions")}
  lengths_B = np.array([len(p["tokens"]) for p in prompts], np.int32)
  for b, (p, n) in enumerate(zip(prompts, lengths_B)):
    if n > length:
      raise ValueError(f"prompt of {n} positions does not fit in {length}")
    at = slice(length - n, length) if right_aligned else slice(0, n)
    for k in PROMPT_FIELDS:
      batch[k][b, at] = p[k]
    batch["segment_ids"][b, at] = 1
    batch["positions"][b, at] = np.arange(n)
  return batch, lengths_B
