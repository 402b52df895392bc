"""The Grain pipeline: record format, determinism, resume, host slicing, packing, latents."""
import json
import types

import grain
import numpy as np
import pytest
from etils import epath

from tfx import patching, record
from tfx.data import builders, examples, packing, pipeline, tokenizer
from data_testing import small_config

TOK = types.SimpleNamespace(pad_id=0, bos_id=2, eos_id=3, boi_id=4, eoi_id=5)
P = 48   # 4x4 pixel patches of 3 channels


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in record.FIELDS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def config():
  return small_config()


def test_batches_follow_record_format(config):
  b = next(pipeline.make_iterator(config, process_index=0, process_count=1))
  record.check(b, config.seq_len, P)
  assert b["tokens"].shape == (config.global_batch_size, config.seq_len)
  image = b["modality"] == record.IMAGE
  assert image.any() and (~image & (b["segment_ids"] > 0)).any()
  assert np.abs(b["patches"]).max() <= 1.0 and not b["patches"][~image].any()
  assert not b["lm_mask"][image].any() and not b["noise_limited"][~image].any()
  assert b["tokens"].max() < tokenizer.model_vocab_size(config)


def test_evaluation_splits(config):
  for split in ("validation", "heldout"):
    b = next(pipeline.make_iterator(config, split=split, process_index=0, process_count=1))
    record.check(b, config.seq_len, P)
  with pytest.raises(ValueError, match="no split 'nope'"):
    pipeline.make_iterator(config, split="nope", process_index=0, process_count=1)


def test_deterministic_for_a_seed(config):
  a = _take(pipeline.make_iterator(config, process_index=0, process_count=1), 3)
  _assert_batches_equal(a, _take(pipeline.make_iterator(config, process_index=0, process_count=1), 3))
  other = config.copy_and_resolve_references()
  other.seed = 1
  c = _take(pipeline.make_iterator(other, process_index=0, process_count=1), 3)
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_restore_mid_epoch_through_grain_checkpoint_handler(config, tmp_path):
  it = pipeline.make_iterator(config, process_index=0, process_count=1)
  _take(it, 5)   # 200 train images / ~1.5 per record: well inside the first epoch
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
  expected = _take(it, 4)
  fresh = pipeline.make_iterator(config, process_index=0, process_count=1)
  handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(fresh))
  _assert_batches_equal(expected, _take(fresh, 4))


def _image_keys(batches, k):
  """Byte strings of every image (its n patches) in the batches."""
  keys = []
  for b in batches:
    for row in range(b["tokens"].shape[0]):
      for m in range(1, b["image_ids"][row].max() + 1):
        keys.append(b["patches"][row][b["image_ids"][row] == m].tobytes())
  return keys


def test_two_hosts_read_disjoint_slices_and_fixed_streams_give_the_same_global_batch(config):
  for size in (7, 200):
    parts = [list(pipeline.slice_positions(size, s, 2)) for s in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == list(range(size))
  # By default each host is one stream; host 0 only ever shows the images of its slice [0::2].
  k = config.image.patch_size
  def patches_of(ex):
    return patching.patchify(pipeline.pixels_to_model(ex["image"], config.image.resolution), k).tobytes()
  source = pipeline.open_source(config, "image_text", "train")
  mine = {patches_of(source[i]) for i in range(0, len(source), 2)}
  theirs = {patches_of(source[i]) for i in range(1, len(source), 2)}
  host0 = _take(pipeline.make_iterator(config, process_index=0, process_count=2), 3)
  host1 = _take(pipeline.make_iterator(config, process_index=1, process_count=2), 3)
  assert host0[0]["tokens"].shape == (config.global_batch_size // 2, config.seq_len)
  seen = _image_keys(host0, k)
  assert seen and set(seen) <= mine and not set(seen) & theirs
  # With data.streams fixed at 2, one host builds exactly the batches the two hosts build together.
  two_streams = config.copy_and_resolve_references()
  two_streams.data.streams = 2
  one = _take(pipeline.make_iterator(two_streams, process_index=0, process_count=1), 3)
  _assert_batches_equal(one, [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(host0, host1)])
  with pytest.raises(ValueError, match="multiple of the 2 hosts"):
    bad = config.copy_and_resolve_references()
    bad.data.streams = 3
    pipeline.make_iterator(bad, process_index=0, process_count=2)


def test_a_source_smaller_than_the_batch_is_read_by_every_row(config):
  c = config.copy_and_resolve_references()
  c.data.image_text_weight = 0.0
  c.global_batch_size = 16
  docs = len(pipeline.open_source(c, "text", "validation"))
  assert docs < 16
  b = next(pipeline.make_iterator(c, split="validation", process_index=0, process_count=1))
  record.check(b, c.seq_len, P)
  assert len({b["tokens"][r].tobytes() for r in range(16)}) > 1   # rows differ by their shuffle


def _random_examples(rng, n_examples, n_patches):
  out = []
  for _ in range(n_examples):
    if rng.random() < 0.5:
      out.append(examples.text_example(rng.integers(10, 100, rng.integers(1, 150)).tolist(), TOK, P))
    else:
      caption = rng.integers(10, 100, rng.integers(0, 12)).tolist()
      patches = rng.normal(size=(n_patches, P)).astype(np.float32)
      out.append(examples.image_text_example(caption, patches, TOK, caption_first=bool(rng.random() < 0.8)))
  return out


def test_packing_keeps_every_token_and_patch_and_never_splits_an_image():
  rng = np.random.default_rng(0)
  n, seq_len, max_images = 16, 64, 2
  exs = _random_examples(rng, 200, n)
  records = packing.pack_examples(exs, seq_len=seq_len, pad_id=TOK.pad_id, max_images=max_images)
  got_tokens, got_patches = [], []
  for r in records:
    record.check(r, seq_len, P)
    seg = r["segment_ids"]
    used = seg > 0
    assert used.any() and (np.diff(seg[used]) >= 0).all() and seg[used][0] == 1
    assert not used[used.argmin():].any() if not used.all() else True   # padding only at the end
    for s in range(1, seg.max() + 1):
      np.testing.assert_array_equal(r["positions"][seg == s], np.arange((seg == s).sum()))
    assert r["image_ids"].max() <= max_images
    for m in range(1, r["image_ids"].max() + 1):
      where = np.flatnonzero(r["image_ids"] == m)
      assert len(where) == n and (np.diff(where) == 1).all()
      assert r["tokens"][where[0] - 1] == TOK.boi_id and r["tokens"][where[-1] + 1] == TOK.eoi_id
      assert (r["modality"][where] == record.IMAGE).all()
    learn = r["lm_mask"] > 0
    i = np.flatnonzero(learn)
    assert (r["modality"][i] == record.TEXT).all() and (r["modality"][i + 1] == record.TEXT).all()
    assert (seg[i] == seg[i + 1]).all() and (r["lm_targets"][i] == r["tokens"][i + 1]).all()
    got_tokens.append(r["tokens"][used])
    got_patches.append(r["patches"][used])
  np.testing.assert_array_equal(np.concatenate(got_tokens), np.concatenate([e["tokens"] for e in exs]))
  np.testing.assert_array_equal(np.concatenate(got_patches), np.concatenate([e["patches"] for e in exs]))
  fill = np.mean([(r["segment_ids"] > 0).mean() for r in records])
  print(f"packing fill: {fill:.3f} of {len(records)} records")
  assert fill > 0.8


def test_compact_examples_pack_like_dense_ones():
  rng = np.random.default_rng(3)
  dense = _random_examples(rng, 120, 16)
  compact = []
  for e in dense:
    is_image = e["modality"] == record.IMAGE
    c = {k: v for k, v in e.items() if k != "patches"}
    compact.append(dict(c, image_patches=e["patches"][is_image]))
  kw = dict(seq_len=64, pad_id=TOK.pad_id, max_images=2)
  _assert_batches_equal(packing.pack_examples(dense, **kw), packing.pack_examples(compact, **kw))
  ex = examples.image_text_example([11, 12], np.ones((4, P), np.float32), TOK, caption_first=False, compact=True)
  want = examples.image_text_example([11, 12], np.ones((4, P), np.float32), TOK, caption_first=False)
  assert "patches" not in ex and ex["image_patches"].shape == (4, P)
  for k in ("tokens", "modality", "image_ids", "noise_limited"):
    np.testing.assert_array_equal(ex[k], want[k])


def _reference_write_records(records, seq_len, patch_dim, pad_id):
  """The packed batch built the plain way: concatenate each record's pieces, then fill the fields."""
  out = record.zeros(seq_len, patch_dim, (len(records),))
  out["tokens"][:] = pad_id
  out["lm_targets"][:] = pad_id
  for row, pieces in enumerate(records):
    if not pieces:
      continue
    dense = []
    for ex, a, b in pieces:
      full = np.zeros((examples.length(ex), patch_dim), np.float32)
      if "patches" in ex:
        full = ex["patches"]
      else:
        full[ex["modality"] == record.IMAGE] = ex["image_patches"]
      dense.append({k: ex[k][a:b] for k in ("tokens", "modality", "noise_limited", "image_ids")} | {"patches": full[a:b]})
    n = sum(len(d["tokens"]) for d in dense)
    for k in ("tokens", "modality", "noise_limited", "patches"):
      out[k][row, :n] = np.concatenate([d[k] for d in dense])
    offset, start = 0, 0
    for seg, d in enumerate(dense, 1):
      m = len(d["tokens"])
      out["segment_ids"][row, start:start + m] = seg
      out["positions"][row, start:start + m] = np.arange(m)
      out["image_ids"][row, start:start + m] = np.where(d["image_ids"] > 0, d["image_ids"] + offset, 0)
      offset += int(d["image_ids"].max()) if m else 0
      start += m
    for i in range(n - 1):
      if out["segment_ids"][row, i] == out["segment_ids"][row, i + 1]:
        out["lm_targets"][row, i] = out["tokens"][row, i + 1]
        out["lm_mask"][row, i] = out["modality"][row, i] == out["modality"][row, i + 1] == record.TEXT
  return out


def test_write_records_matches_a_plain_reference():
  """Pieces of dense and compact examples, whole and cut, several images a record, empty records."""
  rng = np.random.default_rng(5)
  dense = _random_examples(rng, 80, 4)
  compact = [examples.image_text_example(e["tokens"][2:5], e["patches"][e["modality"] == record.IMAGE], TOK,
                                         caption_first=bool(i % 2), compact=True)
             if not e["splittable"] else examples.text_example(e["tokens"][1:-1], TOK, P, compact=True)
             for i, e in enumerate(dense)]
  exs = dense + compact
  records = []
  for r in range(12):
    pieces = []
    for j in rng.choice(len(exs), rng.integers(0, 5), replace=False):
      ex = exs[j]
      n = examples.length(ex)
      a, b = (0, n) if not ex["splittable"] else sorted(rng.integers(0, n + 1, 2))
      if b > a:
        pieces.append((ex, int(a), int(b)))
    records.append(pieces if sum(b - a for _, a, b in pieces) <= 96 else pieces[:1])
  got = packing.write_records(records, 96, P, TOK.pad_id)
  want = _reference_write_records(records, 96, P, TOK.pad_id)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert (got["image_ids"].max(axis=1) >= 2).any() and not got["segment_ids"].all(axis=1).all()


def test_packing_state_restores_at_every_record():
  exs = _random_examples(np.random.default_rng(1), 60, 16)
  texts = [e for e in exs if e["splittable"]]
  pairs = [e for e in exs if not e["splittable"]]
  ds = packing.MixPackIterDataset([grain.MapDataset.source(pairs).to_iter_dataset(),
                                   grain.MapDataset.source(texts).to_iter_dataset()], [0.5, 0.5],
                                  seq_len=64, pad_id=TOK.pad_id, max_images=2)
  it = iter(ds)
  states, records = [], []
  while True:
    states.append(json.loads(json.dumps(it.get_state())))
    try:
      records.append(next(it))
    except StopIteration:
      break
  for start in (1, 5, len(records) // 2, len(records) - 1):
    again = iter(ds)
    again.set_state(states[start])
    _assert_batches_equal(records[start:], list(again))


def _segments(records):
  """(is_image_pair, tokens) of every packed segment, in order."""
  out = []
  for r in records:
    for s in range(1, r["segment_ids"].max() + 1):
      m = r["segment_ids"] == s
      out.append((bool(r["image_ids"][m].any()), r["tokens"][m]))
  return out


def test_mixing_by_position_shares_fills_gaps_with_text():
  rng = np.random.default_rng(2)
  exs = _random_examples(rng, 400, 16)
  texts = [e for e in exs if e["splittable"]]
  pairs = [e for e in exs if not e["splittable"]]
  for w_image in (0.5, 0.8):
    streams = [grain.MapDataset.source(pairs).repeat().to_iter_dataset(),
               grain.MapDataset.source(texts).repeat().to_iter_dataset()]
    it = iter(packing.MixPackIterDataset(streams, [w_image, 1 - w_image], seq_len=64, pad_id=0, max_images=2))
    records = [next(it) for _ in range(300)]
    segs = _segments(records)
    image_positions = sum(len(t) for is_img, t in segs if is_img)
    share = image_positions / sum(len(t) for _, t in segs)
    fill = np.mean([(r["segment_ids"] > 0).mean() for r in records])
    assert abs(share - w_image) < 0.03 and fill > 0.99, (w_image, share, fill)
    # Each stream keeps its own order: the pairs come out as the source lists them.
    firsts = [t for is_img, t in segs if is_img][:len(pairs)]
    for got, ex in zip(firsts, pairs):
      np.testing.assert_array_equal(got, ex["tokens"])


def test_oversized_image_example_is_a_clear_error():
  ex = examples.image_text_example([11] * 10, np.zeros((64, P), np.float32), TOK)
  with pytest.raises(ValueError, match="cannot fit seq_len=32"):
    packing.pack_examples([ex], seq_len=32, pad_id=0, max_images=4)


def test_example_orders_and_noise_limit():
  patches = np.ones((4, P), np.float32)
  t2i = examples.image_text_example([11, 12], patches, TOK, caption_first=True)
  i2t = examples.image_text_example([11, 12], patches, TOK, caption_first=False)
  assert t2i["tokens"].tolist() == [2, 11, 12, 4, 0, 0, 0, 0, 5, 3] and not t2i["noise_limited"].any()
  assert i2t["tokens"].tolist() == [2, 4, 0, 0, 0, 0, 5, 11, 12, 3]
  assert i2t["noise_limited"].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
  r = packing.pack_one(t2i, 16, pad_id=0)
  # BOI's position predicts no patch, the last patch predicts no EOI; the caption predicts BOI.
  assert r["lm_mask"].tolist()[:10] == [1, 1, 1, 0, 0, 0, 0, 0, 1, 0]


def test_caption_order_and_dropout_fractions(config):
  c = config.copy_and_resolve_references()
  c.data.caption_dropout = 0.5
  c.data.text_weight = 0.0
  first, dropped = [], []
  for b in _take(pipeline.make_iterator(c, process_index=0, process_count=1), 40):
    for row in range(b["tokens"].shape[0]):
      for m in range(1, b["image_ids"][row].max() + 1):
        start = np.flatnonzero(b["image_ids"][row] == m)[0]
        limited = bool(b["noise_limited"][row, start])
        first.append(not limited)
        if not limited:
          dropped.append(b["tokens"][row, start - 2] == 2)   # BOS right before BOI: no caption
  assert len(first) > 150
  assert 0.7 < np.mean(first) < 0.9 and 0.35 < np.mean(dropped) < 0.65


def test_latent_datasets_are_read_directly(tmp_path, config):
  rng = np.random.default_rng(0)
  latents = rng.normal(size=(6, 4, 4, 4)).astype(np.float32)
  def gen():
    for i, lat in enumerate(latents):
      yield str(i), {"latent": lat, "caption": "a red circle"}
  path = builders.write_dataset(builders.ImageText, str(tmp_path), builders.image_text_features(latent_shape=(4, 4, 4)),
                                {"train": gen})
  c = config.copy_and_resolve_references()
  c.data.image_text, c.data.text = str(tmp_path), ""
  c.autoencoder.kind, c.autoencoder.downsample, c.autoencoder.latent_channels = "vae", 4, 4
  c.autoencoder.shift_factor, c.autoencoder.scaling_factor = 0.5, 2.0
  c.image.patch_size = 2
  b = next(pipeline.make_iterator(c, process_index=0, process_count=1))
  record.check(b, c.seq_len, 16)
  want = {patching.patchify((lat - 0.5) * 2.0, 2).tobytes() for lat in latents}
  got = _image_keys([b], 2)
  assert got and set(got) <= want
  with pytest.raises(ValueError, match="run the latent caching command"):
    vae_on_pixels = c.copy_and_resolve_references()
    vae_on_pixels.data.image_text = "shapes"
    pipeline.make_iterator(vae_on_pixels, process_index=0, process_count=1)
  c.autoencoder.kind = "pixels"
  with pytest.raises(ValueError, match="no `image` feature"):
    pipeline.make_iterator(c, process_index=0, process_count=1)
  assert path.startswith(str(tmp_path))


def test_record_reader_decodes_like_tfds(tmp_path, config):
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(0)
  features = tfds.features.FeaturesDict({"latent": tfds.features.Tensor(shape=(4, 4, 2), dtype=np.float32),
                                         "counts": tfds.features.Tensor(shape=(3,), dtype=np.int64),
                                         "caption": tfds.features.Text()})
  def gen():
    for i in range(5):
      yield str(i), {"latent": rng.normal(size=(4, 4, 2)).astype(np.float32), "counts": rng.integers(-9, 9, 3),
                     "caption": f"caption {i} \u00e9"}
  builders.write_dataset(builders.ImageText, str(tmp_path), features, {"train": gen})
  sources = {"lean": builders.open_split(str(tmp_path), "train"), "text": pipeline.open_source(config, "text", "train"),
             "pixels": pipeline.open_source(config, "image_text", "validation")}
  for name, src in sources.items():
    read = pipeline.record_reader(src)
    assert (read == src.__getitem__) == (name == "pixels"), name   # PNG images read through tfds
    for i in range(5):
      got, want = read(i), src[i]
      assert got.keys() == want.keys()
      for k in want:
        assert type(got[k]) is type(want[k]), k
        if isinstance(want[k], np.ndarray):
          assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_multiprocess_prefetch_matches_in_process_and_resumes(config):
  c = config.copy_and_resolve_references()
  c.data.worker_count = 1
  it = pipeline.make_iterator(c, process_index=0, process_count=1)
  again = pipeline.make_iterator(c, process_index=0, process_count=1)
  try:
    got = _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    got += _take(it, 2)
    again.set_state(state)
    resumed = _take(again, 2)
  finally:
    it.close()
    again.close()
  _assert_batches_equal(_take(pipeline.make_iterator(config, process_index=0, process_count=1), 4), got)
  _assert_batches_equal(got[2:], resumed)


def _bench(*args):
  import os, pathlib, subprocess, sys
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repo))
  return subprocess.run([sys.executable, "-m", "tfx.data.bench", *args], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=300)


def test_bench_cli_measures_the_paper_shape_and_rejects_bad_flags():
  r = _bench("--shape=paper", "--paper_images=40", "--paper_rows=2", "--batches=2", "--prefetch=0")
  assert r.returncode == 0, r.stderr[-2000:]
  line = [l for l in r.stdout.splitlines() if l.startswith("paper:") and "records/s" in l][0]
  assert "of 2 x 4096" in line and "2 batches timed" in line and float(line.split()[1]) > 0
  bad = _bench("--batches=0")
  assert bad.returncode == 2 and bad.stderr.strip() == "tfx.data.bench: error: --batches must be >= 1, got 0"
