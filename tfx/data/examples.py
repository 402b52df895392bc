"""One example's fields before packing: a text document or an image-caption pair.

An example is a dict of arrays with leading length T:
  tokens [T] int32, patches [T, P] float32, modality [T] int32,
  image_ids [T] int32 (1 on the patches of the example's image), noise_limited [T] int32
and `splittable` (bool scalar array): text documents may be cut across records,
image-caption pairs never are. A compact example (the training pipeline's) holds
`image_patches` [N, P] (the patches of its N image positions, in order) instead
of `patches`, so text costs no patch memory, and `num_images` (int scalar array), so packing
need not count them; a compact image-caption example also holds `patch_start`, the position of
its first patch (its patches are one run). `tfx.data.packing` turns examples into records
of tfx/record.py. Generation and evaluation build prompts with the same helpers.
"""
import functools

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
            "image_ids": zeros, "noise_limited": zeros, "splittable": np.asarray(True),
            "num_images": np.asarray(0)}
  return _fields(tokens, np.zeros((t, patch_dim), np.float32), zeros, zeros, zeros, True)


@functools.lru_cache(maxsize=4096)
def _pair_layout(caption_len: int, n: int, caption_first: bool, bos: int | None, eos: int | None,
                 image_last: bool, boi: int, eoi: int, pad: int):
  """(token template with the caption's slots, caption start, first patch, modality, image_ids,
  noise_limited) of an image-caption example; shared read-only arrays (one per layout, not per example:
  building them was most of an example's cost at the paper shape)."""
  head = [bos] if bos is not None else []
  image = [boi] + [pad] * n + ([] if image_last else [eoi])
  tail = [eos] if eos is not None and not image_last else []
  caption = [pad] * caption_len
  parts = [head, caption, image, tail] if caption_first else [head, image, caption, tail]
  tokens = np.asarray(sum(parts, []), np.int32)
  caption_start = len(head) if caption_first else len(head) + len(image)
  start = len(head) + (caption_len if caption_first else 0) + 1   # the first patch, after BOI
  is_patch = np.zeros(len(tokens), bool)
  is_patch[start:start + n] = True
  modality = np.where(is_patch, record.IMAGE, record.TEXT).astype(np.int32)
  image_ids = is_patch.astype(np.int32)
  noise_limited = image_ids if not caption_first else np.zeros(len(tokens), np.int32)
  for a in (tokens, modality, image_ids, noise_limited):
    a.flags.writeable = False
  return tokens, caption_start, start, modality, image_ids, noise_limited


def image_text_example(caption_ids, patches_NP: np.ndarray, tok, *, caption_first: bool = True,
                       bos: bool = True, eos: bool = True, image_last: bool = False,
                       compact: bool = False) -> dict[str, np.ndarray]:
  """`[BOS] caption BOI patches EOI [EOS]` or, image first, `[BOS] BOI patches EOI caption [EOS]`.

  Image-first pairs mark their patches noise_limited (their timestep is capped,
  so the caption is learned from a mostly clean image). `image_last=True` ends a
  caption-first prompt after the image's patches (no EOI/EOS), for generation.
  `compact=True` keeps the patches as `image_patches` [n, P] (see the module docstring).
  modality, image_ids and noise_limited are read-only arrays shared by examples of one layout.
  """
  patches_NP = np.asarray(patches_NP, np.float32)
  if patches_NP.ndim != 2:
    raise ValueError(f"patches must be [n, P], got {patches_NP.shape}")
  n, p = patches_NP.shape
  caption = np.asarray(caption_ids, np.int32).reshape(-1)
  template, caption_start, start, modality, image_ids, noise_limited = _pair_layout(
      len(caption), n, bool(caption_first), tok.bos_id if bos else None, tok.eos_id if eos else None,
      bool(image_last), tok.boi_id, tok.eoi_id, tok.pad_id)
  tokens = template.copy()
  tokens[caption_start:caption_start + len(caption)] = caption
  if compact:
    return {"tokens": tokens, "image_patches": patches_NP, "modality": modality, "image_ids": image_ids,
            "noise_limited": noise_limited, "splittable": np.asarray(False), "num_images": np.asarray(int(n > 0)),
            "patch_start": np.asarray(start)}
  patches = np.zeros((len(tokens), p), np.float32)
  patches[start:start + n] = patches_NP
  return _fields(tokens, patches, modality, image_ids, noise_limited, False)


def code_image_text_example(caption_ids, code_ids, tok, patch_dim: int, *, caption_first: bool = True,
                            bos: bool = True, eos: bool = True, image_last: bool = False,
                            compact: bool = False) -> dict[str, np.ndarray]:
  """`image_text_example`'s layouts for a discrete image (tfx/image_codes.py): its code token ids
  (already offset past the text vocabulary) sit between BOI and EOI as text positions; never split."""
  caption = list(np.asarray(caption_ids, np.int32).reshape(-1))
  image = [tok.boi_id] + list(np.asarray(code_ids, np.int32).reshape(-1)) + ([] if image_last else [tok.eoi_id])
  ids = caption + image if caption_first else image + caption
  out = text_example(ids, tok, patch_dim, bos=bos, eos=eos and not image_last, compact=compact)
  out["splittable"] = np.asarray(False)
  return out


def edit_example(source_NP: np.ndarray, instruction_ids, target_NP: np.ndarray, tok, *,
                 compact: bool = False) -> dict[str, np.ndarray]:
  """`[BOS] BOI source EOI instruction BOI target EOI [EOS]`: an image edit, images 1 and 2.

  The source's patches are noise_limited (the target is learned from a mostly clean
  source, as a caption from an image-first pair's image); generation gives it clean.
  """
  first = image_text_example([], source_NP, tok, caption_first=False, eos=False, compact=compact)
  second = image_text_example(instruction_ids, target_NP, tok, bos=False, compact=compact)
  second["image_ids"] = second["image_ids"] * 2
  scalars = ("splittable", "num_images", "patch_start")   # patch_start: one pair's run, not two
  out = {k: np.concatenate([first[k], second[k]]) for k in first if k not in scalars}
  out["splittable"] = np.asarray(False)
  if compact:
    out["num_images"] = np.asarray(int(first["num_images"]) + int(second["num_images"]))
  return out


def length(example: dict[str, np.ndarray]) -> int:
  return int(example["tokens"].shape[0])


def num_images(example: dict[str, np.ndarray]) -> int:
  if "num_images" in example:
    return int(example["num_images"])
  ids = example["image_ids"]
  return int(ids.max()) if ids.size else 0

