"""Bounded input: prompts cut or refused at the model's limits, images read as regular files within
byte and pixel caps, bad prepare lines skipped by line number, numeric CLI flags checked (exit 2)."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tfx import config as tfx_config
from tfx import generate, image_io
from tfx import model as model_lib
from tfx.data import shapes
from tfx.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def gen():
  c = tfx_config.default()
  c.model.vocab_size = 48
  c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 1, 2, 2
  c.image.resolution, c.image.patch_size = 16, 4
  c.seq_len, c.data.max_caption_tokens = 96, 8
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.train_model(shapes.grammar_captions(np.random.default_rng(0), 400), 40))
  return generate.Generator(c, model_lib.build_model(c, nnx.Rngs(0)), tokenizer=tok)


def test_text_to_image_cuts_captions_like_training(gen):
  long = "a red circle " * 300   # ~900 tokens: far past seq_len 96
  assert len(gen.tokenizer.encode(long)) > 96 and len(gen.caption_ids(long)) == 8
  a, b = (gen.text_to_image([p], steps=2, cfg_scale=1.0) for p in (long, long + "two blue squares"))
  np.testing.assert_array_equal(a, b)  # only the first max_caption_tokens tokens are seen


def test_prompts_past_the_context_are_refused_and_sampling_ranges_checked(gen):
  with pytest.raises(generate.PromptTooLongError, match=r"longer than the model's context \(seq_len 96\)"):
    gen.complete(["a red circle " * 100], max_tokens=2)
  with pytest.raises(generate.PromptTooLongError):
    gen.generate(["a red circle " * 100], max_tokens=2)
  for kw, match in (({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                    ({"top_k": -1}, "top_k")):
    with pytest.raises(ValueError, match=match):
      gen.complete(["a"], **kw)
  with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
    gen.text_to_image(["a"], cfg_scale=-1.0)


def _png(size) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", size, (200, 30, 30)).save(out, format="PNG")
  return out.getvalue()


def test_images_are_regular_files_within_byte_and_pixel_caps(tmp_path):
  with pytest.raises(image_io.ImageReadError, match="not a regular file"):
    generate.load_image("/dev/zero")   # before: read until the host ran out of memory
  with pytest.raises(image_io.ImageReadError, match="not a regular file"):
    generate.load_image(str(tmp_path))
  path = tmp_path / "a.png"
  path.write_bytes(_png((20, 10)))
  assert generate.load_image(str(path)).shape == (10, 20, 3)
  size = path.stat().st_size
  with pytest.raises(image_io.ImageTooLargeError, match=f"is {size} bytes, over the {size - 1}-byte limit"):
    image_io.read_bytes(path, max_bytes=size - 1)
  with pytest.raises(image_io.ImageTooLargeError, match="20x10 pixels, over the 199-pixel limit"):
    image_io.decode_rgb(path.read_bytes(), "a.png", max_pixels=199)


def _cli(module, *args, timeout=120):
  proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return proc.returncode, proc.stdout, proc.stderr.strip()


def test_sample_cli_refuses_a_device_as_image_in_one_line(tmp_path):
  code, _, err = _cli("tfx.sample", "--workdir", str(tmp_path), "--image", "/dev/zero")
  assert (code, err) == (2, "tfx.sample: error: cannot read image /dev/zero: not a regular file")


@pytest.mark.parametrize("cli, flags, message", [
    ("sample", ["--prompt", "a", "--out", "o", "--cfg_scale", "-1"], "--cfg_scale must be >= 0, got -1.0"),
    ("sample", ["--prompt", "a", "--out", "o", "--steps", "0"], "--steps must be >= 1, got 0"),
    ("sample", ["--prompt", "a", "--out", "o", "--temperature", "-0.5"], "--temperature must be >= 0"),
    ("sample", ["--prompt", "a", "--out", "o", "--batch_size", "0"], "--batch_size must be >= 1"),
    ("evaluate", ["--cfg_scales", "3", "-1"], "--cfg_scales must be >= 0, got -1.0"),
    ("evaluate", ["--batch_size", "0"], "--batch_size must be >= 1"),
    ("prepare", ["--input", "i", "--output", "o", "--resolution", "100000"], "--resolution must be in [8, 4096]"),
])
def test_numeric_flags_are_checked_in_one_line(tmp_path, capsys, cli, flags, message):
  from tfx import evaluate, sample
  from tfx.data import prepare
  parse = {"sample": sample.parse_args, "evaluate": evaluate.parse_args, "prepare": prepare.main}[cli]
  with pytest.raises(SystemExit) as e:
    parse(flags if cli == "prepare" else ["--workdir", str(tmp_path), *flags])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_prepare_skips_bad_lines_by_number_and_non_regular_images(tmp_path):
  (tmp_path / "a.png").write_bytes(_png((20, 20)))
  lines = [json.dumps({"image": "a.png", "caption": "a red square"}).encode(),
           b'{"image": "a.png", "caption": "caf\xe9"}',          # Latin-1, not UTF-8
           b"[1, 2]",
           json.dumps({"image": "a.png"}).encode(),
           json.dumps({"image": ["a.png"], "caption": "x"}).encode(),
           json.dumps({"image": "/dev/zero", "caption": "endless"}).encode(),
           json.dumps({"image": "a.png", "caption": "the same square"}).encode()]
  (tmp_path / "pairs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  code, out, err = _cli("tfx.data.prepare", "--input", str(tmp_path / "pairs.jsonl"),
                        "--output", str(tmp_path / "ds"), "--resolution", "8")
  assert code == 0, err
  assert [x for x in err.splitlines() if x.startswith("tfx.data.prepare")] == ["tfx.data.prepare: skipped pairs.jsonl line 2: not UTF-8",
                              "tfx.data.prepare: skipped pairs.jsonl line 3: a JSON list, not an object",
                              "tfx.data.prepare: skipped pairs.jsonl line 4: no 'caption' key",
                              "tfx.data.prepare: skipped pairs.jsonl line 5: 'image' is a list, not a string"]
  assert ("prepared 2 pairs (2 train, 0 validation); skipped: 0 corrupt images, 1 missing images, "
          "0 empty captions, 4 bad lines, 0 oversized images") in out
