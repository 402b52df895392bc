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
