"""`python -m tfx.data.prepare --input=PATH --output=DIR`: your image-caption pairs -> a tfx dataset.

PATH is a JSON-lines file of {"image": path, "caption": text} (image paths
relative to the file), a webdataset tar shard as img2dataset writes them
(`KEY.jpg` + `KEY.txt`), or a directory holding such files; local or a URL
(gs://, with the tfx[gcs] extra), as is --output. Images of any size
and mode become RGB, center-cropped and resized to --resolution. Unreadable or
missing images (a local image must be a regular file), images over
tfx.image_io's byte or pixel cap, empty captions and bad lines (not UTF-8, not a
JSON object with string "image" and "caption") are skipped and counted; the first
bad lines are named with their line numbers. Train with `--config.data.image_text=DIR`.
"""
import dataclasses
import json
import os
import sys
import tarfile
import zlib
from typing import Iterator

import numpy as np
from PIL import Image

from tfx import arguments, fs, image_io
from tfx.data import builders

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_NAMED_BAD_LINES = 20  # bad lines reported one by one; the rest only counted
MAX_RESOLUTION = 4096  # --resolution cap: one stored image is 3 * R^2 bytes
_TOO_LARGE = object()  # stands for the bytes of an image over image_io.MAX_IMAGE_BYTES (never read)


@dataclasses.dataclass
class Counts:
  written: int = 0
  validation: int = 0
  corrupt_images: int = 0
  missing_images: int = 0
  empty_captions: int = 0
  bad_lines: int = 0
  oversized_images: int = 0
  bad_line_notes: list = dataclasses.field(default_factory=list)  # the first _NAMED_BAD_LINES, "FILE line N: why"

  def bad_line(self, where: str, why: str) -> None:
    self.bad_lines += 1
    if len(self.bad_line_notes) < _NAMED_BAD_LINES:
      self.bad_line_notes.append(f"{where}: {why}")

  def summary(self) -> str:
    return (f"prepared {self.written} pairs ({self.written - self.validation} train, "
            f"{self.validation} validation); skipped: {self.corrupt_images} corrupt images, "
            f"{self.missing_images} missing images, {self.empty_captions} empty captions, "
            f"{self.bad_lines} bad lines, {self.oversized_images} oversized images")


def to_square_rgb(data: bytes, resolution: int) -> np.ndarray:
  """Encoded image bytes -> uint8 [R, R, 3]: RGB, center crop, resize. Raises ImageReadError
  (ImageTooLargeError over the pixel cap) on unusable data."""
  rgb = image_io.decode_rgb(data)
  w, h = rgb.size
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  rgb = rgb.crop((left, top, left + s, top + s))
  return np.asarray(rgb.resize((resolution, resolution), Image.Resampling.BICUBIC), np.uint8)


def _parse_line(raw: bytes) -> tuple[str, str]:
  """(image, caption) of one JSON-lines row; raises ValueError saying what is wrong."""
  try:
    row = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    raise ValueError("not UTF-8") from None
  except ValueError:
    raise ValueError("not JSON") from None
  if not isinstance(row, dict):
    raise ValueError(f"a JSON {type(row).__name__}, not an object")
  for key in ("image", "caption"):
    if key not in row:
      raise ValueError(f"no {key!r} key")
    if not isinstance(row[key], str):
      raise ValueError(f"{key!r} is a {type(row[key]).__name__}, not a string")
  return row["image"], row["caption"]


def _jsonl_pairs(path: str, counts: Counts) -> Iterator[tuple[str, object, str]]:
  """(key, image bytes / None when unreadable / _TOO_LARGE, caption) per good line; bad lines are counted."""
  base = os.path.dirname(os.path.abspath(path)) if fs.is_local(path) else os.path.dirname(path)
  name = os.path.basename(path)
  with fs.open(path, "rb") as f:  # bytes: one line that is not UTF-8 must not end the file
    for n, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        image, caption = _parse_line(raw)
      except ValueError as e:
        counts.bad_line(f"{name} line {n}", str(e))
        continue
      image_path = image if fs.scheme(image) else fs.join(base, os.path.expanduser(image))
      try:
        data = image_io.read_bytes(image_path)
      except image_io.ImageTooLargeError:
        data = _TOO_LARGE
      except image_io.ImageReadError:
        data = None
      yield f"{name}:{n - 1}", data, caption


def _tar_pairs(path: str, counts: Counts) -> Iterator[tuple[str, object, str]]:
  """(key, image bytes, caption) per KEY of a webdataset shard, streamed (a sample's files are adjacent)."""
  def emit(key, files):
    image = next((files[e] for e in _IMAGE_EXTS if e in files), None)
    if ".txt" not in files:
      if image is not None:
        counts.bad_line(f"{os.path.basename(path)} member {key}", "an image without a .txt caption")
      return None
    caption = files[".txt"]
    caption = "" if caption is _TOO_LARGE else caption.decode("utf-8", errors="replace")
    return f"{os.path.basename(path)}:{key}", image, caption

  key, files = None, {}
  try:
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        k, ext = os.path.splitext(member.name)
        if k != key and key is not None:
          if (pair := emit(key, files)) is not None:
            yield pair
          files = {}
        key = k
        if ext.lower() in _IMAGE_EXTS + (".txt",):
          # an oversized member is not read; the stream skips past it
          files[ext.lower()] = (_TOO_LARGE if member.size > image_io.MAX_IMAGE_BYTES
                                else tar.extractfile(member).read())
  except (tarfile.TarError, OSError) as e:
    print(f"tfx.data.prepare: stopped reading tar {path}: {e}", file=sys.stderr)
  if key is not None and (pair := emit(key, files)) is not None:
    yield pair


def input_files(path: str) -> list[str]:
  """The .jsonl / .tar files that PATH names (a file, or a directory of them)."""
  if fs.isdir(path):
    return [fs.join(path, n) for n in fs.listdir(path) if n.endswith((".jsonl", ".tar"))]
  if fs.exists(path):
    return [path]
  raise FileNotFoundError(f"input does not exist: {path}")


def examples(path: str, resolution: int, validation_fraction: float, counts: Counts, split: str):
  """(key, example) pairs of one split. The train pass looks at every pair and does the counting."""
  tally = split == "train"
  scratch = Counts()
  for file in input_files(path):
    read = _tar_pairs if file.endswith(".tar") else _jsonl_pairs
    for key, data, caption in read(file, counts if tally else scratch):
      in_val = zlib.crc32(key.encode()) % 10_000 < validation_fraction * 10_000
      if not tally and not in_val:
        continue
      image, reason = None, None
      if not caption.strip():
        reason = "empty_captions"
      elif data is None:
        reason = "missing_images"
      elif data is _TOO_LARGE:
        reason = "oversized_images"
      else:
        try:
          image = to_square_rgb(data, resolution)
        except image_io.ImageTooLargeError:
          reason = "oversized_images"
        except image_io.ImageReadError:
          reason = "corrupt_images"
      if tally:
        if reason:
          setattr(counts, reason, getattr(counts, reason) + 1)
        else:
          counts.written += 1
          counts.validation += in_val
      if image is not None and in_val == (split == "validation"):
        yield key, {"image": image, "caption": caption.strip()}


def prepare(input_path: str, output_dir: str, resolution: int, validation_fraction: float = 0.0) -> Counts:
  """Writes the dataset under output_dir (which must not hold anything); returns the counts."""
  counts = Counts()
  with builders.new_dataset_dir(output_dir) as tmp:
    files = input_files(input_path)
    if not files:
      raise ValueError(f"no .jsonl or .tar files in {input_path}")
    source = os.path.abspath(input_path) if fs.is_local(input_path) else input_path
    splits = {"train": lambda: examples(input_path, resolution, validation_fraction, counts, "train")}
    if validation_fraction > 0:
      splits["validation"] = lambda: examples(input_path, resolution, validation_fraction, counts, "validation")
    try:
      builders.write_dataset(builders.ImageText, tmp, builders.image_text_features(resolution=resolution),
                             splits, description=f"Prepared from {source}")
    except AssertionError as e:   # tfds refuses to write an empty split
      if counts.written == 0:
        raise ValueError(f"no usable image-caption pair in {input_path} ({counts.summary()})") from None
      raise ValueError(f"a split would be empty ({counts.summary()}); "
                       f"change --validation_fraction") from e
  return counts


def main(argv=None) -> int:
  p = arguments.ArgumentParser(prog="python -m tfx.data.prepare", description=__doc__.splitlines()[0])
  p.add_argument("--input", required=True, help="JSON-lines file, webdataset .tar, or a directory of them")
  p.add_argument("--output", required=True, help="new (or empty) directory for the dataset")
  p.add_argument("--resolution", type=int, default=256, help="side of the stored square images")
  p.add_argument("--validation_fraction", type=float, default=0.0, help="share of pairs held out as validation")
  args = p.parse_args(argv)
  if not 8 <= args.resolution <= MAX_RESOLUTION:
    p.error(f"--resolution must be in [8, {MAX_RESOLUTION}], got {args.resolution}")
  if not 0.0 <= args.validation_fraction < 1.0:
    p.error(f"--validation_fraction must be in [0, 1), got {args.validation_fraction}")
  try:
    counts = prepare(args.input, args.output, args.resolution, args.validation_fraction)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"tfx.data.prepare: error: {e}", file=sys.stderr)
    return 2
  for note in counts.bad_line_notes:
    print(f"tfx.data.prepare: skipped {note}", file=sys.stderr)
  if counts.bad_lines > len(counts.bad_line_notes):
    print(f"tfx.data.prepare: ... and {counts.bad_lines - len(counts.bad_line_notes)} more bad lines",
          file=sys.stderr)
  print(counts.summary())
  print(f"dataset written to {args.output}; train with --config.data.image_text={args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
