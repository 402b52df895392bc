"""Presets apply before command-line overrides; the vocabulary follows the tokenizer (Llama 2 layout fixture)."""
import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

import tfx.config
from tfx import record, trainer
from tfx import workdir as workdir_lib
from tfx.data import pipeline, tokenizer
from tfx.model import build_model, presets
from data_testing import small_config
from train_helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = os.fspath(ROOT / "tests" / "fixtures" / "llama_layout.model")


def _parse(*argv):
  """The config tfx.train builds from a command line: ml_collections' flag parsing, then the preset flag."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values)
  with mock.patch.object(sys, "argv", ["prog", *argv]):  # config_flags reads its overrides from sys.argv
    values(sys.argv)
  return presets.apply_overrides(values.config, config_flags.get_override_values(values["config"]))


def _n_params(config) -> int:
  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_command_line_model_flags_win_over_the_experiments_preset():
  c = _parse("--config=experiments/transfusion.py:size=0.16B", "--config.model.n_layers=2")
  m = presets.resolve(c).model
  assert (m.preset, m.n_layers, m.d_model, m.n_heads, m.mlp_dim) == ("0.16B", 2, 768, 12, 2048)
  # a preset named on the command line applies first too, under the other model flags
  c = _parse("--config=experiments/shapes.py", "--config.model.n_layers=3", "--config.model.preset=tiny")
  assert (c.model.n_layers, c.model.d_model, c.model.n_kv_heads, c.model.encoder) == (3, 64, 2, "unet")
  with pytest.raises(ValueError, match="unknown model.preset '9B'"):
    _parse("--config=experiments/shapes.py", "--config.model.preset=9B")


def test_dryrun_cli_builds_the_overridden_model():
  """The acceptance command: size=0.16B with --config.model.n_layers=2 gives 2 layers."""
  flags_ = ["--config.model.n_layers=2", "--config.seq_len=64", "--config.global_batch_size=2",
            "--config.image.max_images_per_seq=1", "--config.model.scan_layers=False", "--config.model.remat=none"]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "tfx.dryrun", "--config=experiments/transfusion.py:size=0.16B,patch=8",
                        "--num_devices=1", *flags_], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  c = _parse("--config=experiments/transfusion.py:size=0.16B,patch=8", *flags_)
  assert json.loads(out.stdout)["params"] == _n_params(c)
  c.model.n_layers = 16
  per_block = (_n_params(c) - json.loads(out.stdout)["params"]) / 14
  assert per_block == 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768  # 14 blocks fewer, each q,k,v,o + SwiGLU + norms


def test_a_preset_named_but_not_applied_is_an_error_and_old_workdir_configs_resolve_as_saved():
  c = tfx.config.default()
  c.model.preset = "0.16B"
  with pytest.raises(ValueError, match=r"presets.apply\(config, '0.16B'\)"):
    presets.resolve(c)
  # config.json of a run saved before presets applied first: the preset's sizes and 32000 written out
  saved = tfx.config.default().to_dict()
  saved["model"].update(presets.PRESETS["0.16B"], preset="0.16B", vocab_size=32000, n_layers=16)
  resolved = presets.resolve(workdir_lib.config_from_dict(saved))
  assert resolved.model.to_dict() == workdir_lib.config_from_dict(saved).model.to_dict()


def test_a_derived_vocabulary_resuming_keeps_the_saved_size_when_the_tokenizer_fits(tmp_path):
  c = small_config()
  assert trainer.resolve(c, tmp_path).model.vocab_size == 1024  # no config.json: derived
  for saved, want in ((1280, 1280), (512, 1024)):  # 512 < the 1024 ids needed: derived (and refused on resume)
    d = c.copy_and_resolve_references()
    d.model.vocab_size = saved
    workdir_lib.save_config(tmp_path, d)
    assert trainer.resolve(c, tmp_path).model.vocab_size == want
  d.model.vocab_size = 1000
  with pytest.raises(trainer.ConfigError, match="model.vocab_size=1000 is smaller than the 1024 ids"):
    trainer.resolve(d)


@pytest.mark.parametrize("patch, share", [(2, 0.5), (4, 0.5), (8, None)])
def test_the_paper_mix_has_text_documents_and_half_patches_where_possible(patch, share):
  from test_dryrun import EXPERIMENT
  d = EXPERIMENT.get_config(f"size=0.16B,patch={patch}").data
  n = (32 // patch) ** 2
  pair = n + 2 + EXPERIMENT.CAPTION_TOKENS
  patches = d.image_text_weight * n / pair  # share of all positions that are image patches
  assert d.text_weight > 0 and d.image_text_weight + d.text_weight == pytest.approx(1.0)
  # where captions outweigh the patches, text documents get as many positions as patches
  assert patches == pytest.approx(share if share else d.text_weight, abs=1e-3)


def test_experiment_vocabulary_is_the_tokenizers_or_llama_2s():
  from test_dryrun import EXPERIMENT
  assert EXPERIMENT.get_config("size=7B").model.vocab_size == 32128  # 32,000 + PAD/BOI/EOI, rounded to 128
  c = EXPERIMENT.get_config(f"size=7B,tokenizer={FIXTURE}")
  assert presets.resolve(c).model.vocab_size == 4096


def test_pipeline_model_and_a_train_step_use_the_llama_layout_tokenizer(tmp_path):
  c = tiny_config(**{"data.tokenizer": FIXTURE, "data.data_dir": small_config().data.data_dir,
                     "data.shapes_train_size": 200, "data.shapes_eval_size": 40, "total_steps": 2,
                     "checkpoint_every_steps": 0, "sample_every_steps": 0})
  tok = tokenizer.load(c)
  b = next(pipeline.make_iterator(c, process_index=0, process_count=1))
  text = b["tokens"][b["modality"] == record.TEXT]
  assert {tok.boi_id, tok.eoi_id} <= set(text.tolist()) and text.max() < 4003
  assert (b["tokens"][b["segment_ids"] == 0] == tok.pad_id).all()  # padding is the appended PAD id
  model = nnx.eval_shape(lambda: build_model(trainer.resolve(c, tmp_path), nnx.Rngs(0)))
  assert model.embed.table.shape == (4096, c.model.d_model)
  result = trainer.run(c, tmp_path)
  assert result["step"] == 2 and np.isfinite(result["loss"])
  assert workdir_lib.load_config(tmp_path).model.vocab_size == 4096
