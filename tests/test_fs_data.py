"""Datasets, the tokenizer and autoencoders on a non-local filesystem (memory://).

tfds writes array_record files on a local disk: writers upload to the URL;
readers read the URL through fsspec (tfx.data.array_records). Each test compares
what went through memory:// with the local result.
"""
import io
import json
import pathlib
import tarfile
import uuid

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import numpy as np
import pytest
from PIL import Image

from tfx import autoencoder, fs, record
from tfx.autoencoder import diffusers, nets, vae
from tfx.data import builders, builtin, pipeline, prepare, tokenizer
from data_testing import small_config

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def url():
  path = f"memory://tfx-{uuid.uuid4().hex[:8]}/data"
  yield path
  bucket = path.split("://")[1].split("/")[0]
  if fsspec.filesystem("memory").exists(bucket):
    fsspec.filesystem("memory").rm(bucket, recursive=True)


def _download(url: str, local: pathlib.Path) -> str:
  fsspec.filesystem("memory").get(url.split("://")[1], str(local), recursive=True)
  return str(local)


def _rows(path: str, split: str = "train") -> list[dict]:
  source = builders.open_split(path, split)
  return [source[i] for i in range(len(source))]


def _assert_same_rows(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_upload_dir_copies_the_tree_and_the_last_files_last(url, tmp_path, monkeypatch):
  (tmp_path / "1.0.0").mkdir()
  for name in ("a.array_record", "dataset_info.json", "z.json"):
    (tmp_path / "1.0.0" / name).write_text(name)
  order = []
  put = MemoryFileSystem.put_file
  monkeypatch.setattr(MemoryFileSystem, "put_file",
                      lambda self, lpath, rpath, **kw: (order.append(rpath.rsplit("/", 1)[1]),
                                                        put(self, lpath, rpath, **kw)))
  fs.upload_dir(tmp_path, url, last=("dataset_info.json",))
  assert order[-1] == "dataset_info.json" and sorted(order) == ["a.array_record", "dataset_info.json", "z.json"]
  assert fs.read_text(fs.join(url, "1.0.0", "z.json")) == "z.json"
  assert [(r, f) for r, _, f in fs.walk(url)][-1] == (url + "/1.0.0", sorted(order))


def _png(color) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", (24, 16), color).save(out, format="PNG")
  return out.getvalue()


def test_prepared_dataset_written_to_and_read_from_an_object_store(url, tmp_path):
  raw = tmp_path / "raw"
  (raw / "img").mkdir(parents=True)
  (raw / "img" / "r.png").write_bytes(_png((200, 30, 30)))
  (raw / "img" / "b.png").write_bytes(_png((30, 30, 200)))
  (raw / "pairs.jsonl").write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in
                                           [("img/r.png", "red"), ("img/b.png", "blue"), ("img/x.png", "gone")]))
  with tarfile.open(raw / "00000.tar", "w") as tar:   # a webdataset shard
    for name, data in (("k.png", _png((30, 200, 30))), ("k.txt", b"green")):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  fs.upload_dir(raw, fs.join(url, "raw"))
  remote, local = fs.join(url, "prepared"), str(tmp_path / "prepared")
  counts = prepare.prepare(fs.join(url, "raw"), remote, resolution=8)   # input and output on memory://
  assert counts == prepare.prepare(str(raw), local, resolution=8)
  assert (counts.written, counts.missing_images) == (3, 1)
  _assert_same_rows(_rows(remote), _rows(local))
  _assert_same_rows(_rows(_download(remote, tmp_path / "copy")), _rows(local))
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    prepare.prepare(str(raw), remote, resolution=8)


def test_builtin_data_dir_on_an_object_store(url, tmp_path):
  config = small_config(url)
  config.data.shapes_train_size, config.data.shapes_eval_size = 8, 2
  root = builtin.shapes_dir(config)
  assert root == fs.join(url, "shapes", "n8_e2_r2") and builtin.resolve(config, "shapes") == root
  assert builders.split_names(builtin.resolve(config, root)) == {"train", "validation", "test", "heldout"}
  config.data.data_dir = str(tmp_path / "local")
  _assert_same_rows(_rows(root, "heldout"), _rows(builtin.shapes_dir(config), "heldout"))

  config.data.data_dir = url
  path = builtin.ensure_tokenizer(config)
  assert path.startswith(url) and builtin.ensure_tokenizer(config) == path
  tok = tokenizer.from_file(path)
  assert tok.decode(tok.encode("a red circle")) == "a red circle"
  with pytest.raises(FileNotFoundError, match="cannot read tokenizer"):
    tokenizer.from_file(fs.join(url, "missing.model"))


def test_autoencoders_on_an_object_store(url, tmp_path):
  cfg = nets.NetConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
  vae.save_metadata(url, cfg, scaling_factor=0.5, shift_factor=0.1)
  assert vae.net_config_from_meta(vae.read_metadata(url)) == cfg
  assert autoencoder.describe(url) == dict(kind="vae", path=url, latent_channels=4, downsample=2,
                                           scaling_factor=0.5, shift_factor=0.1)
  assert fs.listdir(url) == [vae.METADATA_FILE]

  local = FIXTURES / "diffusers_vae_sd"
  remote = fs.join(url, "sd")
  fs.upload_dir(local, remote)
  assert autoencoder.describe(remote) == autoencoder.describe(str(local)) | dict(path=remote)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(diffusers.load(remote).encode(images), diffusers.load(str(local)).encode(images))
  with pytest.raises(autoencoder.AutoencoderError, match="no such file or folder"):
    diffusers.load(fs.join(url, "nothing"))


def test_latent_cache_written_to_an_object_store(url, tmp_path):
  from tfx.autoencoder import cache_latents

  config = small_config(str(tmp_path / "data"))
  config.data.shapes_train_size, config.data.shapes_eval_size = 6, 2
  config.autoencoder.update(kind="diffusers", path=str(FIXTURES / "diffusers_vae_sd"), latent_channels=4,
                            downsample=2, scaling_factor=0.18215)
  remote, local = fs.join(url, "latents"), str(tmp_path / "latents")
  assert cache_latents.cache(config, remote) == cache_latents.cache(config, local)
  for split in ("train", "heldout"):
    _assert_same_rows(_rows(remote, split), _rows(local, split))
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    cache_latents.cache(config, remote)


def test_training_batches_read_from_an_object_store(url, tmp_path):
  """The pipeline on a data_dir (shapes pixels, pydoc text, tokenizer) and a latent dataset copied to
  memory:// gives the batches of the local copies."""
  local = small_config()
  rng = np.random.default_rng(0)
  latents = [rng.normal(size=(4, 4, 4)).astype(np.float32) for _ in range(12)]

  def pairs():
    for i, z in enumerate(latents):
      yield str(i), {"latent": z, "caption": f"a red circle {i}"}

  latent_dir = str(tmp_path / "latents")
  builders.write_dataset(builders.ImageText, latent_dir, builders.image_text_features(latent_shape=(4, 4, 4)),
                         {"train": pairs})
  fs.upload_dir(local.data.data_dir, fs.join(url, "data"))
  fs.upload_dir(latent_dir, fs.join(url, "latents"))
  latent = local.copy_and_resolve_references()
  latent.data.image_text = latent_dir
  latent.autoencoder.update(kind="vae", latent_channels=4, downsample=4)
  for c in (local, latent):
    remote = c.copy_and_resolve_references()
    remote.data.data_dir = fs.join(url, "data")
    if c is latent:
      remote.data.image_text = fs.join(url, "latents")
    want = pipeline.make_iterator(c, process_index=0, process_count=1)
    got = pipeline.make_iterator(remote, process_index=0, process_count=1)
    for _ in range(3):
      a, b = next(want), next(got)
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (a["modality"] == record.IMAGE).any()   # images were read
