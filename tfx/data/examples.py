"""One example's fields before packing: a text document or an image-caption pair.

An example is a dict of arrays with leading length T:
  tokens [T] int32, patches [T, P] float32, modality [T] int32,
  image_ids [T] int32 (1 on the patches of the example's image), noise_limited [T] int32
and `splittable` (bool scalar array): text documents may be cut across records,
image-caption pairs never are. A compact example (the training pipeline's) holds
`image_patches` [N, P] (the patches of its N image positions, in order) instead
of `patches`, so text costs no patch memory. `tfx.data.packing` turns examples into records
of tfx/record.py. Generation and evaluation build prompts with the same helpers.
"""
import numpy as np

from tfx import record


def _fields(tokens: np.ndarray, patches: np.ndarray, modality: np.ndarray, image_ids: np.ndarray,
            noise_limited: np.ndarray, splittable: bool) -> dict[str, np.ndarray]:
  return {"tokens": tokens.astype(np.int32), "patches": patches.astype(np.float32),
          "modality": modality.astype(np.int32), "image_ids": image_ids.astype(np.int32),
          "noise_limited": noise_limited.astype(np.int32), "splittable": np.asarray(splittable)}


def text_example(ids, tok, patch_dim: int, *, bos: bool = True, eos: bool = True,
                 compact: bool = False) -> dict[str, np.ndarray]:
  """`[BOS] ids [EOS]` as a splittable text example."""
  tokens = np.concatenate([[tok.bos_id] if bos else [], np.asarray(ids, np.int32).reshape(-1),
                           [tok.eos_id] if eos else []]).astype(np.int32)
  t = len(tokens)
  zeros = np.zeros(t, np.int32)
  if compact:
    return {"tokens": tokens, "image_patches": np.zeros((0, patch_dim), np.float32), "modality": zeros,
            "image_ids": zeros, "noise_limited": zeros, "splittable": np.asarray(True)}
  return _fields(tokens, np.zeros((t, patch_dim), np.float32), zeros, zeros, zeros, True)


def image_text_example(caption_ids, patches_NP: np.ndarray, tok, *, caption_first: bool = True,
                       bos: bool = True, eos: bool = True, image_last: bool = False,
                       compact: bool = False) -> dict[str, np.ndarray]:
  """`[BOS] caption BOI patches EOI [EOS]` or, image first, `[BOS] BOI patches EOI caption [EOS]`.

  Image-first pairs mark their patches noise_limited (their timestep is capped,
  so the caption is learned from a mostly clean image). `image_last=True` ends a
  caption-first prompt after the image's patches (no EOI/EOS), for generation.
  `compact=True` keeps the patches as `image_patches` [n, P] (see the module docstring).
  """
  patches_NP = np.asarray(patches_NP, np.float32)
  if patches_NP.ndim != 2:
    raise ValueError(f"patches must be [n, P], got {patches_NP.shape}")
  n, p = patches_NP.shape
  caption = np.asarray(caption_ids, np.int32).reshape(-1)
  head = np.asarray([tok.bos_id] if bos else [], np.int32)
  image = np.full(n + 1 + (not image_last), tok.pad_id, np.int32)
  image[0] = tok.boi_id
  if not image_last:
    image[-1] = tok.eoi_id
  tail = np.asarray([tok.eos_id] if eos and not image_last else [], np.int32)
  parts = [head, caption, image, tail] if caption_first else [head, image, caption, tail]
  tokens = np.concatenate(parts)
  start = len(head) + (len(caption) if caption_first else 0) + 1   # the first patch, after BOI
  is_patch = np.zeros(len(tokens), bool)
  is_patch[start:start + n] = True
  modality = np.where(is_patch, record.IMAGE, record.TEXT).astype(np.int32)
  image_ids = is_patch.astype(np.int32)
  noise_limited = image_ids if not caption_first else np.zeros(len(tokens), np.int32)
  if compact:
    return {"tokens": tokens, "image_patches": patches_NP, "modality": modality, "image_ids": image_ids,
            "noise_limited": noise_limited, "splittable": np.asarray(False)}
  patches = np.zeros((len(tokens), p), np.float32)
  patches[is_patch] = patches_NP
  return _fields(tokens, patches, modality, image_ids, noise_limited, False)


def edit_example(source_NP: np.ndarray, instruction_ids, target_NP: np.ndarray, tok, *,
                 compact: bool = False) -> dict[str, np.ndarray]:
  """`[BOS] BOI source EOI instruction BOI target EOI [EOS]`: an image edit, images 1 and 2.

  The source's patches are noise_limited (the target is learned from a mostly clean
  source, as a caption from an image-first pair's image); generation gives it clean.
  """
  first = image_text_example([], source_NP, tok, caption_first=False, eos=False, compact=compact)
  second = image_text_example(instruction_ids, target_NP, tok, bos=False, compact=compact)
  second["image_ids"] = second["image_ids"] * 2
  out = {k: np.concatenate([first[k], second[k]]) for k in first if k != "splittable"}
  out["splittable"] = np.asarray(False)
  return out


def length(example: dict[str, np.ndarray]) -> int:
  return int(example["tokens"].shape[0])


def num_images(example: dict[str, np.ndarray]) -> int:
  ids = example["image_ids"]
  return int(ids.max()) if ids.size else 0

