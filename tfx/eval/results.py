"""What `tfx.evaluate` leaves in a workdir: eval/<step>.json, eval/<step>.png, TensorBoard scalars
(and eval/<step>_alt.* with tags eval_alt/<metric> for the alt split)."""
import dataclasses
import io
import json

from tfx import fs
from tfx.eval import suite

EVAL_SUBDIR = "eval"


def _free_path(directory: str, stem: str, ext: str) -> str:
  """directory/stem.ext, or stem-1.ext, ... if taken: earlier results are never overwritten."""
  path, i = fs.join(directory, stem + ext), 0
  while fs.exists(path):
    i += 1
    path = fs.join(directory, f"{stem}-{i}{ext}")
  return path


def write(workdir: str, step: int, result: suite.Result, options: suite.Options, *, name: str = "") -> str:
  """WORKDIR/eval/<step>[_name].json + .png, TensorBoard scalars (tags eval[_name]/<metric>);
  returns the JSON path."""
  from PIL import Image
  from tfx import generate
  path = _free_path(fs.join(workdir, EVAL_SUBDIR), f"{step}_{name}" if name else str(step), ".json")
  captions = [{"reference": p.caption, "generated": c, "kind": p.kind, "held_out": p.held_out}
              for p, c in zip(result.pairs.prompts, result.captions)]
  record = {"step": step, "metrics": result.metrics, "options": dataclasses.asdict(options),
            "captions": captions, "t2i_prompts": result.pairs.captions[:24]}
  fs.write_text(path, json.dumps(record, indent=1))
  images = result.images[:24]
  scale = max(1, 64 // images.shape[1])  # small images are hard to see: nearest-neighbour upscale
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  png = io.BytesIO()
  Image.fromarray(generate.image_grid(images, cols=8)).save(png, format="PNG")
  fs.write_bytes(path[:-len(".json")] + ".png", png.getvalue())
  writer = fs.tensorboard_writer(fs.join(workdir, "tensorboard"))
  for key, value in result.metrics.items():
    writer.add_scalar(f"eval_{name}/{key}" if name else f"eval/{key}", float(value), step)
  writer.close()
  return path


def write_edits(workdir: str, step: int, result, options) -> str:
  """WORKDIR/eval/<step>_edits.json (metrics, every edit's verdict) + .png (source | edited | target
  for the first 8 edits), TensorBoard scalars; returns the JSON path. `result`: tfx.eval.edits.Result."""
  import numpy as np
  from PIL import Image
  from tfx import generate
  path = _free_path(fs.join(workdir, EVAL_SUBDIR), f"{step}_edits", ".json")
  rows = [{"instruction": e.instruction, "kind": e.kind, "held_out": h, **{k: v[k] for k in ("caption", "keep",
                                                                                         "passed")}}
          for e, h, v in zip(result.edits.edits, result.edits.held_out, result.verdicts)]
  fs.write_text(path, json.dumps({"step": step, "metrics": result.metrics, "options": dataclasses.asdict(options),
                                  "edits": rows}, indent=1))
  n = min(8, len(rows))
  side = result.images.shape[1]
  sources, targets = (_resize(a[:n], side) for a in (result.edits.sources, result.edits.targets))
  triplets = np.stack([sources, result.images[:n], targets], 1).reshape(3 * n, side, side, 3)
  scale = max(1, 64 // side)
  png = io.BytesIO()
  Image.fromarray(generate.image_grid(triplets.repeat(scale, 1).repeat(scale, 2), cols=6)).save(png, format="PNG")
  fs.write_bytes(path[:-len(".json")] + ".png", png.getvalue())
  writer = fs.tensorboard_writer(fs.join(workdir, "tensorboard"))
  for key, value in result.metrics.items():
    writer.add_scalar(f"eval/{key}", float(value), step)
  writer.close()
  return path


def _resize(images, side: int):
  """uint8 [N, S, S, 3] -> [N, side, side, 3] (box filter), as the model sees them."""
  import numpy as np
  from PIL import Image
  return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BOX)) for im in images])
