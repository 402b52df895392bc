"""A small prepared data dir (shapes + pydoc + tokenizer) shared by the data tests of one process."""
import atexit
import functools
import shutil
import tempfile

from tfx import config as tfx_config
from tfx.data import builtin


@functools.lru_cache(maxsize=None)
def _prepared_dir() -> str:
  root = tempfile.mkdtemp(prefix="tfx_data_test_")
  atexit.register(shutil.rmtree, root, True)
  c = small_config(root)
  builtin.ensure_tokenizer(c)
  builtin.pydoc_dir(c)
  builtin.shapes_dir(c)
  return root


def small_config(data_dir: str | None = None):
  """Default config on a small shapes dataset (prepared once per test process)."""
  c = tfx_config.default()
  c.data.data_dir = data_dir or _prepared_dir()
  c.data.shapes_train_size = 200
  c.data.shapes_eval_size = 40
  c.seq_len = 128
  c.global_batch_size = 4
  c.image.resolution = 16
  c.image.patch_size = 4
  return c


def sampling_config(c=None):
  """A model small enough to train for 2 steps and then sample or evaluate (EMA on, 2 denoising
  steps), on `c` (default: small_config())."""
  c = small_config() if c is None else c
  c.total_steps, c.checkpoint_every_steps, c.log_every_steps = 2, 2, 1
  c.global_batch_size, c.seq_len = 8, 96
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.t_embed_dim = 32, 1, 2, 2, 32
  c.optim.warmup_steps, c.optim.ema_decay = 1, 0.9   # EMA params are what sampling loads
  c.diffusion.sample_steps = 2                       # the CLIs' default step count
  return c


def tiny_shapesnet(path: str, scenes: int = 64, steps: int = 3) -> str:
  """A briefly trained 16 px ShapesNet saved at `path`, so evaluations load it instead of training one (slow)."""
  import numpy as np
  from tfx.data import shapes
  from tfx.eval import shapesnet
  rng = np.random.default_rng(0)
  specs = [shapes.sample_spec(rng, shapes.COMBOS) for _ in range(scenes)]
  labels = np.array([[sum((o.color, o.shape) == cs for o in s.objects) for cs in shapes.COMBOS] for s in specs])
  net, _ = shapesnet.train(np.stack([shapes.render(s, 16) for s in specs]), labels, resolution=16,
                           num_classes=4, steps=steps)
  shapesnet.save(net, str(path))
  return str(path)
