"""The embedded datasets and default tokenizer: built on first use under config.data.data_dir.

Layout (data_dir defaults to ~/tensorflow_datasets):
  shapes/n{train}_e{eval}_r{REVISION}/1.0.0/    splits train, validation, test, heldout
  shapes/n{train}_e{eval}_k{p}-{p}-{p}_r{REVISION}/1.0.0/   train's kinds drawn with probabilities p (data.shapes_kind_weights)
  shapes_wide/n{train}_e{eval}_r{REVISION}/1.0.0/   the same splits of the wider world (tfx.data.shapes_wide)
  shapes_edit/n{train}_e{eval}_r{REVISION}/1.0.0/  splits train, test, heldout (sizes: data.shapes_*_size)
  pydoc_topics/r{REVISION}/1.0.0/                splits train, validation
  tfx_tokenizer/v{vocab}_r{REVISION}/tokenizer.model
REVISION changes whenever the generating code changes what is built.
A file lock makes concurrent processes build each thing once; tfds and the
tokenizer writer publish by rename, so a reader never sees half a file.
A URL data_dir (gs://) is built on a local disk and uploaded (dataset_info.json
last); the lock is then a local file, so hosts may each build the same files.
"""
import contextlib
import fcntl
import hashlib
import os
import tempfile
import time

import numpy as np

from tfx import fs
from tfx.data import builders, shapes, shapes_edit, shapes_wide, text_corpus, tokenizer

SHAPES = "shapes"
SHAPES_WIDE = "shapes_wide"
SHAPES_EDIT = "shapes_edit"
PYDOC = "pydoc_topics"
_SHAPES_SEED = 1234          # the dataset is a fixed artifact, independent of config.seed
_TOKENIZER_CAPTIONS = 5000   # grammar captions mixed into the tokenizer's training text
REVISION = 2


def data_dir(config) -> str:
  return os.path.expanduser(config.data.data_dir or "~/tensorflow_datasets")


@contextlib.contextmanager
def _locked(root: str):
  if fs.is_local(root):
    os.makedirs(root, exist_ok=True)
    lock = os.path.join(root, ".tfx_prepare.lock")
  else:  # object stores have no locks: serialise this host's processes
    lock = os.path.join(tempfile.gettempdir(), f"tfx_prepare_{hashlib.sha1(root.encode()).hexdigest()[:12]}.lock")
  with open(lock, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _kind_weights(config) -> tuple[float, ...] | None:
  """config.data.shapes_kind_weights as probabilities over shapes.KINDS; None when even (the default)."""
  w = tuple(float(x) for x in config.data.shapes_kind_weights)
  if len(w) != len(shapes.KINDS) or min(w) < 0 or sum(w) <= 0:
    raise ValueError(f"data.shapes_kind_weights must be {len(shapes.KINDS)} non-negative weights for "
                     f"{'/'.join(shapes.KINDS)} scenes, not all zero; got {config.data.shapes_kind_weights!r}")
  if len(set(w)) == 1:
    return None
  return tuple(x / sum(w) for x in w)


def _shape_examples(split: str, n: int, world: str, weights: tuple[float, ...] | None = None):
  """Scenes of one split; with `weights` (train only) each scene draws its kind first, from its own stream."""
  scenes = shapes if world == SHAPES else shapes_wide

  def gen():
    split_index = ["train", "validation", "test", "heldout"].index(split)
    for i in range(n):
      rng = np.random.default_rng([_SHAPES_SEED, split_index, i])
      kind = None
      if weights is not None:
        kind = shapes.KINDS[rng.choice(len(shapes.KINDS), p=weights)]
      spec = scenes.sample_heldout_spec(rng) if split == "heldout" else scenes.sample_spec(rng, kind=kind)
      if world == SHAPES:
        image = shapes.render(spec)
      else:   # the rendering style is drawn from the same stream, after the scene
        image = shapes_wide.render(spec, rng)
      yield f"{split}-{i:08d}", {"image": image, "caption": shapes.caption(spec), "spec": spec.to_json()}
  return gen


def shapes_dir(config, world: str = SHAPES) -> str:
  """The shapes dataset (`world`: SHAPES or SHAPES_WIDE) for config.data sizes, built if missing."""
  d = config.data
  weights = _kind_weights(config)
  kinds = "" if weights is None else "_k" + "-".join(f"{p:.3g}" for p in weights)
  name = f"n{d.shapes_train_size}_e{d.shapes_eval_size}{kinds}_r{REVISION}"
  root = fs.join(data_dir(config), world, name)
  builder, description = {SHAPES: (builders.Shapes, "Procedural shapes (tfx.data.shapes)"),
                          SHAPES_WIDE: (builders.ShapesWide,
                                        "Procedural shapes, the wider world (tfx.data.shapes_wide)")}[world]

  def build(local_data_dir):
    t0 = time.time()
    sizes = {"train": d.shapes_train_size, "validation": d.shapes_eval_size,
             "test": d.shapes_eval_size, "heldout": d.shapes_eval_size}
    builders.write_dataset(
        builder, local_data_dir,
        builders.image_text_features(resolution=shapes.SIZE, with_spec=True),
        {s: _shape_examples(s, n, world, weights if s == "train" else None)
         for s, n in sizes.items() if n > 0}, config_name=name,
        description=f"{description}; heldout holds colour-shape pairs absent from train.")
    print(f"tfx.data: built {world} {name} in {time.time() - t0:.1f}s under {root}", flush=True)

  return _build_once(config, (world, name), build)


def _edit_examples(split: str, n: int):
  def gen():
    split_index = ["train", "test", "heldout"].index(split)
    for i in range(n):
      rng = np.random.default_rng([_SHAPES_SEED, 1 << 20, split_index, i])   # apart from the shapes streams
      kind = shapes_edit.KINDS[i % len(shapes_edit.KINDS)]
      edit = (shapes_edit.sample_heldout_edit(rng, kind) if split == "heldout"
              else shapes_edit.sample_edit(rng, kind))
      yield f"{split}-{i:08d}", {"source_image": shapes.render(edit.source), "instruction": edit.instruction,
                                 "target_image": shapes.render(edit.target), "edit": edit.to_json()}
  return gen


def shapes_edit_dir(config) -> str:
  """The shapes-edit dataset (kinds in turn) for config.data's shapes sizes, built if missing."""
  d = config.data
  name = f"n{d.shapes_train_size}_e{d.shapes_eval_size}_r{REVISION}"

  def build(local_data_dir):
    t0 = time.time()
    sizes = {"train": d.shapes_train_size, "test": d.shapes_eval_size, "heldout": d.shapes_eval_size}
    builders.write_dataset(
        builders.ShapesEdit, local_data_dir, builders.edit_features(shapes.SIZE),
        {s: _edit_examples(s, n) for s, n in sizes.items() if n > 0}, config_name=name,
        description="Procedural shapes edits (tfx.data.shapes_edit); heldout touches colour-shape pairs "
                    "absent from train.")
    print(f"tfx.data: built shapes_edit {name} in {time.time() - t0:.1f}s", flush=True)

  return _build_once(config, (SHAPES_EDIT, name), build)


def _build_once(config, parts: tuple[str, ...], build) -> str:
  """Runs `build(local data_dir)` unless data_dir/parts holds a dataset; one process builds, others wait."""
  root = fs.join(data_dir(config), *parts)

  def built():
    return fs.exists(fs.join(root, "1.0.0", "dataset_info.json"))
  if not built():
    with _locked(data_dir(config)):
      if not built():
        if fs.is_local(root):
          build(data_dir(config))
        else:
          with tempfile.TemporaryDirectory(prefix=".tfx_builtin_") as tmp:
            build(tmp)
            fs.upload_dir(os.path.join(tmp, *parts), root, last=("dataset_info.json",))
  return root


def _text_examples(split: str):
  def gen():
    for key, text in text_corpus.documents():
      if text_corpus.split_of(key) == split:
        yield key, {"text": text}
  return gen


def pydoc_dir(config) -> str:
  """The pydoc topics text dataset, built if missing."""
  name = f"r{REVISION}"
  return _build_once(config, (PYDOC, name), lambda local_data_dir: builders.write_dataset(
      builders.PydocTopics, local_data_dir, builders.text_features(),
      {s: _text_examples(s) for s in ("train", "validation")}, config_name=name,
      description="English prose of Python's pydoc_data.topics."))


def ensure_tokenizer(config) -> str:
  """Path of the default tokenizer (pydoc prose + shapes captions), trained if missing."""
  vocab = config.data.tokenizer_vocab_size
  path = fs.join(data_dir(config), "tfx_tokenizer", f"v{vocab}_r{REVISION}", "tokenizer.model")
  if fs.exists(path):
    return path
  with _locked(data_dir(config)):
    if not fs.exists(path):
      rng = np.random.default_rng(_SHAPES_SEED)
      texts = [t for k, t in text_corpus.documents() if text_corpus.split_of(k) == "train"]
      texts += shapes.grammar_captions(rng, _TOKENIZER_CAPTIONS)
      fs.write_bytes(path, tokenizer.train_model(texts, vocab))  # atomic
  return path


def resolve(config, name: str) -> str:
  """A data source name from the config -> its dataset directory (built-ins built on demand)."""
  if name in (SHAPES, SHAPES_WIDE):
    return shapes_dir(config, name)
  if name == SHAPES_EDIT:
    return shapes_edit_dir(config)
  if name == PYDOC:
    return pydoc_dir(config)
  path = os.path.expanduser(name)
  if not fs.isdir(path):
    raise FileNotFoundError(f"data source {name!r} is neither a built-in ({SHAPES}, {SHAPES_WIDE}, {SHAPES_EDIT}, {PYDOC}) "
                            f"nor an existing directory")
  return path
