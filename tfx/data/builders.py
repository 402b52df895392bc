"""tfds datasets (array_record, no TensorFlow) that tfx writes and reads.

Feature names, shared by every image-caption dataset (built-in shapes, datasets
from `python -m tfx.data.prepare`, and latent caches written by the autoencoder):
  caption   Text                      the caption (utf-8)
  image     uint8 [R, R, 3] (zlib)    pixels, for autoencoder.kind == "pixels"
  latent    float32 [h, w, c]         autoencoder latents (raw, before shift/scale),
                                      written instead of `image` by a latent cache
  codes     int32 [h, w]              VQ codes, written instead of `image` by a VQ cache (image_mode "discrete")
  spec      Text                      shapes only: the scene as JSON (shapes.Spec)
An edit dataset (built-in shapes_edit) holds instead of caption/image:
  source_image, target_image  uint8 [R, R, 3] (zlib)  the scene before and after the edit
  instruction Text            what to change ("make the red circle blue")
  edit        Text            the edit as JSON (tfx.data.shapes_edit.Edit)
Text datasets hold one feature:
  text      Text                      one document

A dataset is any folder holding one tfds version directory (dataset_info.json);
`new_dataset_dir` + `write_dataset` make one, `open_split` reads a split as a
random-access source.

Object stores: tfds writes array_record files on a local disk only, so a URL
output is written locally and then uploaded (tfx.fs.upload_dir). Reading goes
through tfx.fs (fsspec) for any URL: the metadata files are copied to a local
temporary folder for tfds, and tfx.data.array_records reads the records.
"""
import bisect
import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterable

from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds

from tfx import fs
from tfx.data import array_records

Examples = Callable[[], Iterable[tuple[str, dict]]]


class _ArrayRecordDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds builder whose features and split examples are given at construction."""

  VERSION = tfds.core.Version("1.0.0")
  # No download checksums to look up; tfds' lookup would need importlib_resources.
  code_path = None

  def __init__(self, *, features: tfds.features.FeaturesDict, split_examples: dict[str, Examples],
               description: str = "", **kwargs):
    self._features = features
    self._split_examples = split_examples
    self._description = description
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=self._features, description=self._description)

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(name) for name in self._split_examples}

  def _generate_examples(self, split: str):
    yield from self._split_examples[split]()


class Shapes(_ArrayRecordDataset, skip_registration=True):
  """The procedural shapes dataset (tfx.data.shapes)."""


class ShapesWide(_ArrayRecordDataset, skip_registration=True):
  """The wider shapes world (tfx.data.shapes_wide); tfds names its folder shapes_wide."""


class ShapesEdit(_ArrayRecordDataset, skip_registration=True):
  """The procedural shapes-edit dataset (tfx.data.shapes_edit)."""


class PydocTopics(_ArrayRecordDataset, skip_registration=True):
  """Prose of Python's pydoc topics (tfx.data.text_corpus)."""


class ImageText(_ArrayRecordDataset, skip_registration=True):
  """Image-caption pairs prepared from user data, or their cached latents."""


def image_text_features(*, resolution: int | None = None, latent_shape: tuple[int, int, int] | None = None,
                        codes_shape: tuple[int, int] | None = None,
                        with_spec: bool = False) -> tfds.features.FeaturesDict:
  """Features of an image-caption dataset: pixels at `resolution`, latents of `latent_shape` or
  VQ codes (int32) of `codes_shape`."""
  if sum(x is not None for x in (resolution, latent_shape, codes_shape)) != 1:
    raise ValueError("give exactly one of resolution (pixels), latent_shape (latents) or codes_shape (VQ codes)")
  f = {"caption": tfds.features.Text()}
  if resolution is not None:
    f["image"] = tfds.features.Tensor(shape=(resolution, resolution, 3), dtype=np.uint8, encoding="zlib")
  elif codes_shape is not None:
    f["codes"] = tfds.features.Tensor(shape=tuple(codes_shape), dtype=np.int32)
  else:
    f["latent"] = tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float32)
  if with_spec:
    f["spec"] = tfds.features.Text()
  return tfds.features.FeaturesDict(f)


def edit_features(resolution: int) -> tfds.features.FeaturesDict:
  """Features of an edit dataset: source and target pixels at `resolution`, the instruction, the edit."""
  image = lambda: tfds.features.Tensor(shape=(resolution, resolution, 3), dtype=np.uint8, encoding="zlib")
  return tfds.features.FeaturesDict({"source_image": image(), "instruction": tfds.features.Text(),
                                     "target_image": image(), "edit": tfds.features.Text()})


def text_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({"text": tfds.features.Text()})


@contextlib.contextmanager
def new_dataset_dir(output_dir: str):
  """Yields a local scratch folder to write a dataset into; on success it becomes `output_dir`.

  `output_dir` (local or URL) must not exist or be empty. A local one is
  renamed into place; a URL gets an upload with dataset_info.json last, so a
  reader never sees half a dataset either way.
  """
  if fs.exists(output_dir) and (not fs.isdir(output_dir) or fs.listdir(output_dir)):
    raise FileExistsError(f"output {output_dir} is not empty (or not a directory); refusing to overwrite it")
  local = fs.is_local(output_dir)
  parent = os.path.dirname(os.path.abspath(output_dir)) if local else None
  if parent:
    os.makedirs(parent, exist_ok=True)   # same filesystem as output_dir, for the rename
  tmp = tempfile.mkdtemp(prefix=".tfx_dataset_", dir=parent)
  try:
    yield tmp
    if not local:
      fs.upload_dir(tmp, output_dir, last=("dataset_info.json",))
    else:
      if os.path.exists(output_dir):
        os.rmdir(output_dir)   # empty, checked above
      os.replace(tmp, output_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_dataset(builder_cls: type, out_dir: str, features: tfds.features.FeaturesDict,
                  split_examples: dict[str, Examples], *, config_name: str | None = None,
                  description: str = "", compress: bool = True) -> str:
  """Writes the splits as array_record files under the local folder `out_dir`; returns the version dir.

  Each split is a callable returning (unique key, example) pairs. tfds writes into
  a temporary directory and renames it at the end, so readers never see half a dataset.
  `compress=False` rewrites tfds' zstd records uncompressed (for latents: see _uncompress).
  """
  tfds.disable_progress_bar()
  config = tfds.core.BuilderConfig(name=config_name) if config_name else None
  downloads = os.path.join(out_dir, ".downloads")
  os.makedirs(downloads, exist_ok=True)
  # A new tfds builder makes an empty tempfile.mkdtemp() for dataset metadata from GCS (a
  # lookup that is disabled and returns at once) and never removes it: keep it in `downloads`.
  system_tempdir, tempfile.tempdir = tempfile.tempdir, downloads
  try:
    builder = builder_cls(features=features, split_examples=split_examples, description=description,
                          data_dir=out_dir, config=config)
  finally:
    tempfile.tempdir = system_tempdir
  builder.download_and_prepare(download_dir=downloads)
  for root, _, _ in sorted(os.walk(downloads), reverse=True):   # tfds leaves empty dirs; nothing is downloaded
    with contextlib.suppress(OSError):
      os.rmdir(root)
  if not compress:
    for name in os.listdir(builder.data_dir):
      if ".array_record" in name:
        _uncompress(os.path.join(builder.data_dir, name))
  return os.fspath(builder.data_dir)


def _uncompress(path: str) -> None:
  """Rewrites an array_record file with the same records, uncompressed (tfds always writes zstd).

  Why, for latent caches: float32 latents barely compress (a 32x32x8 record: 30.6 KB
  zstd against 32.8 KB raw), and decompressing one took ~40 us of CPU, the largest
  cost of the training pipeline at the paper shape.
  """
  reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
  tmp = path + ".uncompressed"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1,uncompressed")
  for i in range(reader.num_records()):
    writer.write(reader.read([i])[0])
  writer.close()
  reader.close()
  os.replace(tmp, path)


def find_dataset_dir(path: str) -> str:
  """The tfds version directory inside `path` (itself, or exactly one below it)."""
  path = os.path.expanduser(path)
  if not fs.isdir(path):
    raise FileNotFoundError(f"dataset directory does not exist: {path}")
  found = sorted(root for root, _, files in fs.walk(path)
                 if "dataset_info.json" in files and not os.path.basename(root).startswith("incomplete"))
  if not found:
    raise FileNotFoundError(f"no tfds dataset (dataset_info.json) under {path}; "
                            "make one with `python -m tfx.data.prepare`")
  if len(found) > 1:
    raise ValueError(f"{path} holds several datasets ({', '.join(found)}); point at one of them")
  return found[0]


_metadata_copies: dict[str, tempfile.TemporaryDirectory] = {}


def _builder(version_dir: str):
  """tfds' builder for a version dir; for a URL, from a local copy of its metadata files
  (tfds reads metadata through etils.epath, which knows gs:// but not every fsspec URL)."""
  if fs.is_local(version_dir):
    return tfds.builder_from_directory(version_dir)
  if version_dir not in _metadata_copies:
    tmp = tempfile.TemporaryDirectory(prefix="tfx_dataset_info_")
    for name in fs.listdir(version_dir):
      if ".array_record" not in name and not fs.isdir(fs.join(version_dir, name)):
        with open(os.path.join(tmp.name, name), "wb") as f:
          f.write(fs.read_bytes(fs.join(version_dir, name)))
    _metadata_copies[version_dir] = tmp
  return tfds.builder_from_directory(_metadata_copies[version_dir].name)


class Split:
  """One split of a dataset dir, local or any fsspec URL: len(s), s[i] -> dict of numpy/bytes as tfds
  decodes it, s.raw(i) -> the serialized tf.Example, s.features (tfds FeaturesDict).

  Records are read by tfx.data.array_records (through fsspec), not by array_record's own reader
  (local files and gs:// only). Picklable, for Grain worker processes.
  """

  def __init__(self, version_dir: str, split_info, features):
    self.features = features
    self._files, self._skips, starts = [], [], [0]
    for fi in split_info.file_instructions:
      self._files.append(array_records.ArrayRecordFile(fs.join(version_dir, os.path.basename(fi.filename))))
      self._skips.append(fi.skip)
      starts.append(starts[-1] + fi.take)
    self._starts = starts

  def __len__(self) -> int:
    return self._starts[-1]

  def raw(self, i: int):
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} of a split of {len(self)}")
    f = bisect.bisect_right(self._starts, i) - 1
    return self._files[f][self._skips[f] + i - self._starts[f]]

  def __getitem__(self, i: int) -> dict:
    return self.features.deserialize_example_np(bytes(self.raw(int(i))))


def open_split(path: str, split: str) -> Split:
  """A random-access source (len, [i] -> dict of numpy/bytes) for one split of a dataset dir."""
  version_dir = find_dataset_dir(path)
  info = _builder(version_dir).info
  if split not in info.splits:
    raise ValueError(f"dataset {path} has no split {split!r} (has {sorted(info.splits)})")
  return Split(version_dir, info.splits[split], info.features)


def dataset_info(path: str):
  """tfds' DatasetInfo of a dataset dir (local or URL)."""
  return _builder(find_dataset_dir(path)).info


def split_names(path: str) -> set[str]:
  """Split names of a dataset dir."""
  return set(dataset_info(path).splits)


def feature_names(path: str) -> set[str]:
  """Top-level feature names of a dataset dir."""
  return set(dataset_info(path).features.keys())
