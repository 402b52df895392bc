"""One example's fields before packing: a text document or an image-caption pair.

An example is a dict of arrays with leading length T:
  tokens [T] int32, patches [T, P] float32, modality [T] int32,
  image_ids [T] int32 (1 on the patches of the example's image), noise_limited [T] int32
and `splittable` (bool scalar array): text documents may be cut across records,
image-caption pairs never are. `tfx.data.packing` turns examples into records
of tfx/record.py. Generation and evaluation build prompts with the same helpers.
"""
import numpy as np

from tfx import record


def _fields(tokens: np.ndarray, patches: np.ndarray, modality: np.ndarray, image_ids: np.ndarray,
            noise_limited: np.ndarray, splittable: bool) -> dict[str, np.ndarray]:
  return {"tokens": tokens.astype(np.int32), "patches": patches.astype(np.float32),
          "modality": modality.astype(np.int32), "image_ids": image_ids.astype(np.int32),
          "noise_limited": noise_limited.astype(np.int32), "splittable": np.asarray(splittable)}


def text_example(ids, tok, patch_dim: int, *, bos: bool = True, eos: bool = True) -> dict[str, np.ndarray]:
  """`[BOS] ids [EOS]` as a splittable text example."""
  tokens = np.asarray(([tok.bos_id] if bos else []) + list(ids) + ([tok.eos_id] if eos else []), np.int32)
  t = len(tokens)
  zeros = np.zeros(t, np.int32)
  return _fields(tokens, np.zeros((t, patch_dim), np.float32), zeros, zeros, zeros, True)


def image_text_example(caption_ids, patches_NP: np.ndarray, tok, *, caption_first: bool = True,
                       bos: bool = True, eos: bool = True, image_last: bool = False) -> dict[str, np.ndarray]:
  """`[BOS] caption BOI patches EOI [EOS]` or, image first, `[BOS] BOI patches EOI caption [EOS]`.

  Image-first pairs mark their patches noise_limited (their timestep is capped,
  so the caption is learned from a mostly clean image). `image_last=True` ends a
  caption-first prompt after the image's patches (no EOI/EOS), for generation.
  """
  patches_NP = np.asarray(patches_NP, np.float32)
  if patches_NP.ndim != 2:
    raise ValueError(f"patches must be [n, P], got {patches_NP.shape}")
  n, p = patches_NP.shape
  caption = list(caption_ids)
  head = [tok.bos_id] if bos else []
  image_tok = [tok.boi_id] + [tok.pad_id] * n + ([] if image_last else [tok.eoi_id])
  image_mod = [record.TEXT] + [record.IMAGE] * n + ([] if image_last else [record.TEXT])
  if caption_first:
    parts = [(head + caption, [record.TEXT] * (len(head) + len(caption))), (image_tok, image_mod)]
  else:
    parts = [(head, [record.TEXT] * len(head)), (image_tok, image_mod), (caption, [record.TEXT] * len(caption))]
  tokens = np.asarray([t for toks, _ in parts for t in toks], np.int32)
  modality = np.asarray([m for _, mods in parts for m in mods], np.int32)
  if eos and not image_last:
    tokens = np.append(tokens, np.int32(tok.eos_id))
    modality = np.append(modality, np.int32(record.TEXT))
  is_patch = modality == record.IMAGE
  patches = np.zeros((len(tokens), p), np.float32)
  patches[is_patch] = patches_NP
  image_ids = is_patch.astype(np.int32)
  noise_limited = is_patch.astype(np.int32) if not caption_first else np.zeros(len(tokens), np.int32)
  return _fields(tokens, patches, modality, image_ids, noise_limited, False)


def length(example: dict[str, np.ndarray]) -> int:
  return int(example["tokens"].shape[0])


def num_images(example: dict[str, np.ndarray]) -> int:
  ids = example["image_ids"]
  return int(ids.max()) if ids.size else 0

