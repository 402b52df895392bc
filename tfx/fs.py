"""Paths that may be URLs (gs://, s3://, memory://): one small layer over fsspec.

Every file tfx keeps in a workdir (config.json, metrics.jsonl, TensorBoard
events, sample grids, eval results, autoencoder.json) and every data path
(datasets, tokenizer, autoencoder folders) goes through here, except the Orbax
checkpoints, which Orbax writes itself. tfds writes datasets on a local disk;
`upload_dir` publishes them to a URL. A gs:// path needs gcsfs: `pip install tfx[gcs]`.
"""
import io
import os
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _fs(path) -> tuple[fsspec.AbstractFileSystem, str]:
  try:
    return fsspec.core.url_to_fs(str(path))
  except ImportError as e:  # e.g. gs:// without gcsfs
    raise ImportError(f"cannot open {path}: {e} (pip install 'tfx[gcs]' brings what gs:// needs)") from None


def is_local(path) -> bool:
  return isinstance(_fs(path)[0], LocalFileSystem)


def join(base, *parts: str) -> str:
  """base/part/...; URLs always join with '/'."""
  base = str(base)
  return posixpath.join(base, *parts) if "://" in base else os.path.join(base, *parts)


def scheme(path) -> str:
  """'gs', 's3', 'memory', ... for a URL; '' for a local path."""
  path = str(path)
  return path.split("://", 1)[0] if "://" in path else ""


def exists(path) -> bool:
  fs, p = _fs(path)
  return fs.exists(p)


def isdir(path) -> bool:
  fs, p = _fs(path)
  return fs.isdir(p)


def makedirs(path) -> None:
  fs, p = _fs(path)
  fs.makedirs(p, exist_ok=True)


def remove(path) -> None:
  fs, p = _fs(path)
  fs.rm(p)


def listdir(path) -> list[str]:
  """Names (not paths) in a folder."""
  fs, p = _fs(path)
  return sorted(posixpath.basename(q.rstrip("/")) for q in fs.ls(p, detail=False))


def walk(path):
  """(folder, subfolder names, file names) for every folder under `path`, folders named as `path` is."""
  if is_local(path):
    yield from os.walk(path)
    return
  fs, p = _fs(path)
  base = p.rstrip("/")
  for root, dirs, files in fs.walk(p):
    rel = root.rstrip("/")[len(base):].lstrip("/")
    yield (join(path, rel) if rel else str(path)), sorted(dirs), sorted(files)


def upload_dir(local_dir, url, *, last: tuple[str, ...] = ()) -> None:
  """Copies a local folder tree to `url`; files named in `last` are copied after all others.

  Object stores have no rename, so a reader that waits for a `last` file (a
  dataset's dataset_info.json) never finds a half-copied tree.
  """
  local_dir = os.fspath(local_dir)
  files = sorted(os.path.relpath(os.path.join(root, n), local_dir)
                 for root, _, names in os.walk(local_dir) for n in names)
  fs, _ = _fs(url)
  for rel in sorted(files, key=lambda r: os.path.basename(r) in last):
    _, remote = _fs(join(url, *rel.split(os.sep)))
    fs.put_file(os.path.join(local_dir, rel), remote)


def open(path, mode: str = "r"):  # noqa: A001 - the file layer's open
  """A file object (text unless 'b' in mode); parent folders are made for writes."""
  fs, p = _fs(path)
  if any(m in mode for m in "wa"):
    fs.makedirs(posixpath.dirname(p), exist_ok=True)
  if "b" in mode:
    return fs.open(p, mode)
  return io.TextIOWrapper(fs.open(p, mode.replace("t", "") + "b"), encoding="utf-8", newline="")


def read_text(path) -> str:
  with open(path, "r") as f:
    return f.read()


def read_bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def size(path) -> int:
  fs, p = _fs(path)
  return int(fs.size(p))


def read_range(path, start: int, length: int) -> bytes:
  """`length` bytes from `start`: one ranged read, no file object (whose read-ahead, 5 MB blocks
  on gcsfs, would fetch far more than a random-access reader asks for)."""
  fs, p = _fs(path)
  return fs.cat_file(p, start=start, end=start + length)


def write_bytes(path, data: bytes) -> None:
  """Replaces the file whole: readers see the old or the new content, never a part.

  Local files go through a temporary name and os.replace; an object store's
  upload is already all-or-nothing.
  """
  fs, p = _fs(path)
  if not isinstance(fs, LocalFileSystem):
    with open(path, "wb") as f:
      f.write(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
  with fs.open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, p)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def append_text(path, text: str) -> None:
  """Appends to a file; object stores cannot append, so there the file is rewritten whole."""
  if is_local(path):
    with open(path, "a") as f:
      f.write(text)
    return
  old = read_bytes(path) if exists(path) else b""
  write_bytes(path, old + text.encode("utf-8"))


class _RewrittenFile:
  """A TensorBoard event file on an object store: buffered, uploaded whole at each flush."""

  def __init__(self, path: str):
    self.path, self._buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    write_bytes(self.path, self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _TensorBoardFactory:
  """tensorboardX's hook for URL log dirs, over fsspec (its own gs:// writer needs google-cloud-storage)."""

  def open(self, path: str) -> _RewrittenFile:
    return _RewrittenFile(path)

  def directory_check(self, path: str) -> None:
    makedirs(path)


def tensorboard_writer(logdir):
  """A tensorboardX SummaryWriter that writes to `logdir`, local or URL."""
  from tensorboardX import SummaryWriter, record_writer
  logdir = str(logdir)
  if not is_local(logdir):
    record_writer.register_writer_factory(logdir.split(":")[0], _TensorBoardFactory())
  return SummaryWriter(logdir)
