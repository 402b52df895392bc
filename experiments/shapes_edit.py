"""Image editing: fine-tunes a trained shapes model on the built-in shapes-edit data.

  python -m tfx.train --config=experiments/shapes_edit.py --config.init_from=/tmp/tfx_shapes \
      --workdir=/tmp/tfx_shapes_edit
  python -m tfx.sample --workdir=/tmp/tfx_shapes_edit --edit scene.png --instruction "make the red circle blue" \
      --out /tmp/edited
  python -m tfx.evaluate --workdir=/tmp/tfx_shapes_edit --edits 200

Records are `[BOS] BOI source EOI instruction BOI target EOI [EOS]` (tfx.data.examples.edit_example);
the model is experiments/shapes.py's, so init_from can load its params. ":tiny" matches
experiments/shapes.py:tiny, for tests.
"""
import importlib.util
import pathlib

ARGS = ("", "tiny")


def _shapes_config(arg: str):
  spec = importlib.util.spec_from_file_location("shapes_experiment", pathlib.Path(__file__).with_name("shapes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str | None = None):
  """experiments/shapes.py's model on shapes_edit data, with a fine-tuning schedule."""
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"experiments/shapes_edit.py: unknown argument {arg!r}; choose one of {ARGS}")
  c = _shapes_config(arg)
  dt = c.data
  dt.image_text = "shapes_edit"
  # 20000 train edits (~3 per record): the fine-tune below sees each about once; building
  # them takes a few minutes on first use.
  dt.shapes_train_size, dt.shapes_eval_size = 20000, 500
  c.sample_every_steps = 0           # the sample grid draws captions, which this run does not train
  if arg == "tiny":
    dt.shapes_train_size, dt.shapes_eval_size = 64, 16
    return c
  c.total_steps = 2000
  c.checkpoint_every_steps = 500
  c.diffusion.loss_weight = 5.0      # the weight this fine-tune was measured with (shapes.py's is now 20)
  # and its edits were sampled with guidance 3 at every step (shapes.py's: 5 below 0.6 T)
  c.diffusion.cfg_scale, c.diffusion.cfg_interval = 3.0, (0.0, 1.0)
  o = c.optim
  o.lr, o.warmup_steps, o.end_lr = 1e-3, 50, 5e-5
  return c
