"""`python -m tfx.data.bench`: the host pipeline's throughput, per host, for two record shapes.

  shapes  experiments/shapes.py's data (32 px pixel images at patch 8, 160 positions, batch 4)
          on the built-in shapes + pydoc data (built under --data_dir on first use)
  paper   the paper's record shape (experiments/transfusion.py, patch 2): 4096 positions,
          256-patch latents of 32x32x8 (P = 32), from a prepared image-caption dataset of
          cached latents plus a text dataset, both written by this command into a temp dir
          (random latents and random-word text: a throughput benchmark needs no real data)

Prints records/s and positions/s of `make_iterator` (one host) after one warm-up batch, with the config's data.worker_count and data.prefetch unless overridden.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from tfx import config as tfx_config
from tfx.data import builders, pipeline, tokenizer as tokenizer_lib

PROG = "tfx.data.bench"
SHAPES = ("shapes", "paper")
_LATENT = (32, 32, 8)     # 256 px images under a VAE of downsample 8


class _Parser(argparse.ArgumentParser):
  def error(self, message):   # one line, exit code 2
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def shapes_config(data_dir: str, shapes_train_size: int):
  """experiments/shapes.py's data settings (kept in step with that file)."""
  c = tfx_config.default()
  c.data.data_dir = data_dir
  c.data.shapes_train_size = shapes_train_size
  c.global_batch_size, c.seq_len = 4, 160
  c.image.resolution, c.image.patch_size, c.image.max_images_per_seq = 32, 8, 6
  c.data.image_text_weight, c.data.text_weight = 0.9, 0.1
  c.data.caption_first_fraction = 0.5
  return c


def _words(rng: np.random.Generator, n: int) -> list[str]:
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  return ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(n)]


def write_paper_data(root: str, *, images: int, documents: int, seed: int = 0,
                     compress: bool = False) -> dict[str, str]:
  """A latent image-caption dataset (uncompressed, as tfx.autoencoder.cache_latents writes it, unless
  `compress`), a text dataset and a tokenizer under `root`; their paths."""
  rng = np.random.default_rng(seed)
  vocab = _words(rng, 3000)

  def sentence(n_words):
    return " ".join(rng.choice(vocab, n_words))

  captions = [sentence(int(rng.integers(8, 25))) for _ in range(images)]
  docs = [sentence(int(rng.integers(100, 2000))) for _ in range(documents)]

  def pairs():
    r = np.random.default_rng(seed + 1)
    for i, caption in enumerate(captions):
      yield f"{i:08d}", {"latent": r.normal(size=_LATENT).astype(np.float32), "caption": caption}

  def texts():
    for i, doc in enumerate(docs):
      yield f"{i:08d}", {"text": doc}

  image_text = os.path.join(root, "image_text")
  text = os.path.join(root, "text")
  builders.write_dataset(builders.ImageText, image_text, builders.image_text_features(latent_shape=_LATENT),
                         {"train": pairs}, compress=compress)
  builders.write_dataset(builders.ImageText, text, builders.text_features(), {"train": texts})
  tok = os.path.join(root, "tokenizer.model")
  with open(tok, "wb") as f:
    f.write(tokenizer_lib.train_model(captions[:2000] + docs[:200], 1000))
  return {"image_text": image_text, "text": text, "tokenizer": tok}


def paper_config(paths: dict[str, str], rows: int):
  """experiments/transfusion.py's record shape at patch 2 with `rows` records per batch."""
  c = tfx_config.default()
  c.global_batch_size, c.seq_len = rows, 4096
  c.model.vocab_size = 1024
  c.image.resolution, c.image.patch_size = 256, 2
  n = (_LATENT[0] // 2) ** 2
  c.image.max_images_per_seq = c.seq_len // (n + 2)
  c.autoencoder.kind, c.autoencoder.latent_channels, c.autoencoder.downsample = "vae", _LATENT[2], 8
  # a real VAE's latent shift and scale (Flux's), so the pipeline pays for the latent transform
  c.autoencoder.shift_factor, c.autoencoder.scaling_factor = 0.1159, 0.3611
  c.data.image_text, c.data.text, c.data.tokenizer = paths["image_text"], paths["text"], paths["tokenizer"]
  # experiments/transfusion.py's 1:1 text:image positions with 32-token captions
  c.data.image_text_weight = round((n + 2 + 32) / (2 * n), 4)
  c.data.text_weight = round(1 - c.data.image_text_weight, 4)
  return c


def measure(config, *, batches: int, seconds: float) -> dict[str, float]:
  """Records/s and positions/s of a one-host iterator, after a timed first batch."""
  t0 = time.perf_counter()
  it = pipeline.make_iterator(config, process_index=0, process_count=1)
  try:
    first = next(it)
    startup = time.perf_counter() - t0
    rows, seq_len = first["tokens"].shape
    t1, n, used = time.perf_counter(), 0, 0
    while n < batches and (n == 0 or time.perf_counter() - t1 < seconds):
      b = next(it)
      used += int((b["segment_ids"] > 0).sum())
      n += 1
    dt = time.perf_counter() - t1
  finally:
    if hasattr(it, "close"):
      it.close()
  return {"startup_s": startup, "batches": n, "batches_per_s": n / dt, "records_per_s": n * rows / dt,
          "positions_per_s": n * rows * seq_len / dt, "fill": used / (n * rows * seq_len)}


def _report(name: str, config, r: dict) -> str:
  return (f"{name}: {r['records_per_s']:.1f} records/s, {r['positions_per_s']:,.0f} positions/s per host "
          f"({r['batches_per_s']:.2f} batches/s of {config.global_batch_size} x {config.seq_len}, "
          f"fill {r['fill']:.3f}, workers {config.data.worker_count}, first batch {r['startup_s']:.1f} s, "
          f"{r['batches']} batches timed)")


def main(argv=None) -> int:
  p = _Parser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
  p.add_argument("--shape", choices=SHAPES + ("both",), default="both", help="which record shape to measure")
  p.add_argument("--batches", type=int, default=200, help="most batches timed per shape")
  p.add_argument("--seconds", type=float, default=20.0, help="stop timing a shape after this long")
  p.add_argument("--worker_count", type=int, default=None, help="data.worker_count (default: the config's)")
  p.add_argument("--prefetch", type=int, default=None, help="data.prefetch (default: the config's)")
  p.add_argument("--data_dir", default="", help="where the built-in shapes data lives or is built "
                 "(default ~/tensorflow_datasets)")
  p.add_argument("--shapes_train_size", type=int, default=tfx_config.default().data.shapes_train_size,
                 help="shapes train images (a smaller set builds faster)")
  p.add_argument("--paper_rows", type=int, default=16, help="records per batch at the paper shape")
  p.add_argument("--paper_images", type=int, default=1000, help="latent image-caption pairs written")
  p.add_argument("--compressed_latents", action="store_true",
                 help="write the latents zstd-compressed (tfds' default, latent caches before uncompressed ones)")
  args = p.parse_args(argv)
  for key in ("batches", "paper_rows", "paper_images", "shapes_train_size"):
    if getattr(args, key) < 1:
      p.error(f"--{key} must be >= 1, got {getattr(args, key)}")
  if args.seconds <= 0:
    p.error(f"--seconds must be > 0, got {args.seconds}")
  for key in ("worker_count", "prefetch"):
    if getattr(args, key) is not None and getattr(args, key) < 0:
      p.error(f"--{key} must be >= 0, got {getattr(args, key)}")

  def override(c):
    if args.worker_count is not None:
      c.data.worker_count = args.worker_count
    if args.prefetch is not None:
      c.data.prefetch = args.prefetch
    return c

  if args.shape in ("shapes", "both"):
    c = override(shapes_config(args.data_dir, args.shapes_train_size))
    print(_report("shapes", c, measure(c, batches=args.batches, seconds=args.seconds)), flush=True)
  if args.shape in ("paper", "both"):
    root = tempfile.mkdtemp(prefix="tfx_bench_")
    try:
      t0 = time.perf_counter()
      paths = write_paper_data(root, images=args.paper_images, documents=max(args.paper_images // 4, 2),
                               compress=args.compressed_latents)
      print(f"paper: wrote {args.paper_images} latent pairs + text in {time.perf_counter() - t0:.1f} s", flush=True)
      c = override(paper_config(paths, args.paper_rows))
      print(_report("paper", c, measure(c, batches=args.batches, seconds=args.seconds)), flush=True)
    finally:
      shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
