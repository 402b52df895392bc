"""The evaluation examples: image-caption pairs of a split (with their kinds), and held-out text.

Reads the datasets through tfx.data (nothing here touches tfds directly). For the
shapes dataset each pair carries its scene spec, so prompts know their kind
(single / count / relation); prompts are taken in dataset order, an equal number
per kind, so a run is deterministic and every kind is measured. The `alt` split
(shapes worlds only) is drawn here by tfx.data.shapes_alt, a renderer no dataset
is built with.
"""
import dataclasses
import json

import numpy as np

from tfx.data import builders, builtin, examples, packing, shapes, shapes_alt, tokenizer as tokenizer_lib
from tfx.eval import t2i

HELDOUT_SPLIT = "heldout"
ALT_SPLIT = shapes_alt.SPLIT


@dataclasses.dataclass
class PairSet:
  """Captions, their prompts (kind, held-out flag) and ground-truth uint8 images."""
  prompts: list[t2i.Prompt]
  images: np.ndarray          # uint8 [N, H, W, 3]
  has_kinds: bool             # False for datasets without shapes specs

  @property
  def captions(self) -> list[str]:
    return [p.caption for p in self.prompts]

  def __len__(self) -> int:
    return len(self.prompts)

  def not_held_out(self) -> "PairSet":
    idx = [i for i, p in enumerate(self.prompts) if not p.held_out]
    return PairSet([self.prompts[i] for i in idx], self.images[idx], self.has_kinds)

  def __add__(self, other: "PairSet") -> "PairSet":
    if not len(other):
      return self
    if not len(self):
      return other
    return PairSet(self.prompts + other.prompts, np.concatenate([self.images, other.images]),
                   self.has_kinds and other.has_kinds)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _has_split(path: str, split: str) -> bool:
  try:
    builders.open_split(path, split)
  except ValueError:
    return False
  return True


def load_pairs(config, split: str, num: int, *, held_out: bool = False) -> PairSet:
  """Up to `num` pairs of `split` (its `validation` split when a dataset has no `split`, as
  prepared datasets have none of `test`): num // 3 per kind for shapes, else the first `num`.

  A latent (or VQ code) cache's images are its latents decoded by the config's autoencoder
  (its reconstructions: the pixels are not kept beside the latents).
  """
  path = builtin.resolve(config, config.data.image_text)
  names = builders.feature_names(path)
  if split == ALT_SPLIT:
    if not has_alt(config):
      raise ValueError(f"split {ALT_SPLIT!r} is drawn by the shapes world's second renderer; "
                       f"{path} is not a shapes dataset")
    return alt_pairs(num, held_out=held_out)
  if not names & {"image", "latent", "codes"}:
    raise ValueError(f"evaluation needs the images, latents or VQ codes of {path} (its features hold none)")
  if not _has_split(path, split) and _has_split(path, "validation"):
    split = "validation"
  source = builders.open_split(path, split)
  has_kinds = "spec" in names
  pixels = "image" in names
  per_kind = {k: num // len(t2i.KINDS) for k in t2i.KINDS} if has_kinds else None
  if per_kind is not None:
    for k in t2i.KINDS[:num % len(t2i.KINDS)]:
      per_kind[k] += 1
  prompts, images = [], []
  for i in range(len(source)):
    if len(prompts) >= num:
      break
    ex = source[i]
    kind = json.loads(_text(ex["spec"]))["kind"] if has_kinds else t2i.KINDS[0]
    if per_kind is not None:
      if per_kind[kind] == 0:
        continue
      per_kind[kind] -= 1
    prompts.append(t2i.Prompt(_text(ex["caption"]), kind, held_out))
    images.append(np.asarray(ex["image"] if pixels else ex["codes"] if "codes" in names else ex["latent"]))
  if not prompts:
    raise ValueError(f"split {split!r} of {path} holds no image-caption pairs to evaluate")
  images = np.stack(images)
  return PairSet(prompts, images if pixels else _decode_here(config, images), has_kinds)


def has_alt(config) -> bool:
  """Whether the config's image-caption data is a shapes world (its scenes have specs), so `alt` applies."""
  return "spec" in builders.feature_names(builtin.resolve(config, config.data.image_text))


def alt_pairs(num: int, *, held_out: bool = False) -> PairSet:
  """`num` scenes drawn by the evaluation-only renderer (an equal share per kind), 64 px like the dataset."""
  specs = shapes_alt.scenes(num, held_out=held_out)
  prompts = [t2i.Prompt(shapes.caption(s), s.kind, held_out) for s in specs]
  return PairSet(prompts, np.stack([shapes_alt.render(s) for s in specs]), True)


def _decode_here(config, latents_NhwC: np.ndarray) -> np.ndarray:
  """uint8 images of raw latents (or int VQ codes [N, h, w]), decoded on this process's first device.

  Under a training mesh spanning several processes the decoder's output would span
  devices this process cannot read; each process decodes its own copy instead.
  """
  import jax
  from tfx import autoencoder, mesh as mesh_lib
  from tfx.autoencoder import quality
  local = jax.sharding.Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1, 1), mesh_lib.MESH_AXES)
  with jax.set_mesh(local):
    codes = np.issubdtype(latents_NhwC.dtype, np.integer)
    return quality.to_uint8(quality.batched(autoencoder.load(config).decode,
                                            latents_NhwC if codes else latents_NhwC.astype(np.float32)))


def load_eval_pairs(config, split: str, num: int, num_heldout: int) -> PairSet:
  """`split` pairs plus, when the dataset has a held-out split, `num_heldout` held-out ones
  (for `alt`, held-out scenes drawn by the same renderer)."""
  pairs = load_pairs(config, split, num)
  if split == ALT_SPLIT:
    return pairs + alt_pairs(num_heldout, held_out=True) if num_heldout else pairs
  path = builtin.resolve(config, config.data.image_text)
  if num_heldout and _has_split(path, HELDOUT_SPLIT):
    pairs = pairs + load_pairs(config, HELDOUT_SPLIT, num_heldout, held_out=True)
  return pairs


def text_records(config, max_records: int) -> list[dict]:
  """Packed records of the held-out text documents (test split, else validation)."""
  if not config.data.text:
    return []
  path = builtin.resolve(config, config.data.text)
  split = "test" if _has_split(path, "test") else "validation"
  source = builders.open_split(path, split)
  tok = tokenizer_lib.load(config)
  patch_dim = _patch_dim(config)
  docs = [examples.text_example(tok.encode(_text(source[i]["text"])), tok, patch_dim) for i in range(len(source))]
  records = packing.pack_examples(docs, seq_len=config.seq_len, pad_id=tok.pad_id,
                                  max_images=config.image.max_images_per_seq)
  return records[:max_records]


def caption_records(config, captions: list[str], patches_NnP: np.ndarray | None = None) -> list[dict]:
  """One record per caption: `BOS caption EOS` alone, or `BOS BOI image EOI caption EOS` with its patches
  (model.image_mode "discrete": its VQ codes [N, n])."""
  from tfx import image_codes
  tok = tokenizer_lib.load(config)
  offset = image_codes.code_offset(config, tok) if image_codes.is_discrete(config) else None
  out = []
  for i, caption in enumerate(captions):
    ids = tok.encode(caption)
    if patches_NnP is None:
      ex = examples.text_example(ids, tok, _patch_dim(config))
    elif offset is not None:
      ex = examples.code_image_text_example(ids, patches_NnP[i] + offset, tok, _patch_dim(config),
                                            caption_first=False)
    else:
      ex = examples.image_text_example(ids, patches_NnP[i], tok, caption_first=False)
    out.append(packing.pack_one(ex, config.seq_len, tok.pad_id))
  return out


def _patch_dim(config) -> int:
  from tfx import patching
  return patching.patch_dim(config.image.patch_size, config.autoencoder.latent_channels)


def batches(records: list[dict], batch_size: int):
  """Stacks records into batches (the last one may be smaller)."""
  for i in range(0, len(records), batch_size):
    chunk = records[i:i + batch_size]
    yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
