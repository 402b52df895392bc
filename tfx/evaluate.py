"""`python -m tfx.evaluate --workdir=W`: scores a trained checkpoint with tfx.eval.suite.

Writes WORKDIR/eval/<step>.json (metrics, options, every generated caption with its
reference), a PNG grid of the first 24 generated images beside it (prompts listed in the
JSON), TensorBoard scalars under WORKDIR/tensorboard (tag eval/<metric>), and prints a
short table. For a shapes world it then evaluates the `alt` split too (scenes drawn by an
evaluation-only renderer, tfx.data.shapes_alt; eval/<step>_alt.*, tags eval_alt/<metric>)
and prints its column beside the first; --no_alt skips it. Sweeps: several --cfg_scales
and/or --steps evaluate text-to-image once per combination. --mesh shards the params over a
device mesh as in training (a checkpoint too large for one device). With
--coordinator_address/--num_processes/--process_id (as tfx.train) several processes run it
as one program; only process 0 writes or prints. --edits N scores image edits instead (a run
trained on an edit dataset, e.g. experiments/shapes_edit.py): WORKDIR/eval/<step>_edits.json
and .png, pass rates per edit kind (tfx.eval.edits).
"""
import argparse
import contextlib
import dataclasses
import os
import sys

import jax

from tfx import arguments, distributed, fs, generate, mesh as mesh_lib, restore
from tfx.eval import eval_set, results, suite

USAGE_ERROR = 2

TABLE = [  # (metric, label, format)
    ("t2i_pass", "text-to-image pass", "pct"),
    ("t2i_pass_single", "  one object", "pct"),
    ("t2i_pass_count", "  count", "pct"),
    ("t2i_pass_relation", "  relation", "pct"),
    ("t2i_color_acc", "  colour / shape", "pct2:t2i_shape_acc"),
    ("t2i_count_acc", "  count / position", "pct2:t2i_position_acc"),
    ("t2i_heldout_pass", "  held-out combinations", "pct"),
    ("caption_exact_match", "caption exact match", "pct"),
    ("caption_exact_match_single", "  one object", "pct"),
    ("caption_exact_match_count", "  count", "pct"),
    ("caption_exact_match_relation", "  relation", "pct"),
    ("caption_exact_text", "  same text as the reference", "pct"),
    ("caption_scorer_pass", "caption read back by scorer", "pct"),
    ("caption_heldout_exact_match", "  held-out exact match", "pct"),
    ("caption_cider_d", "caption CIDEr-D (x100)", "x100"),
    ("ppl_text", "perplexity held-out text", "num"),
    ("ppl_caption", "perplexity captions", "num"),
    ("ppl_caption_given_image", "  given their image", "num"),
    ("fd_shapesnet", "FD (ShapesNet features)", "num"),
    ("fd_inception", "FD (Inception, FID)", "num"),
    ("eval_seconds", "seconds", "num"),
]


def _mesh_flag(text: str):
  try:
    return restore.parse_mesh(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
  p = arguments.ArgumentParser(prog="python -m tfx.evaluate", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  d = suite.Options()
  p.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints)")
  p.add_argument("--split", default=d.split, help=f"image-caption split to evaluate ({eval_set.ALT_SPLIT}: scenes "
                                                   "drawn by the evaluation-only renderer)")
  p.add_argument("--no_alt", action="store_true",
                 help=f"skip the {eval_set.ALT_SPLIT} split a shapes world is also evaluated on, beside --split")
  p.add_argument("--num", type=int, default=d.num, help="pairs of --split (equal share per caption kind)")
  p.add_argument("--num_heldout", type=int, default=d.num_heldout, help="pairs of held-out combinations")
  p.add_argument("--cfg_scales", type=float, nargs="+", default=None, help="guidance scales (sweep)")
  p.add_argument("--steps", type=int, nargs="+", default=None, help="denoising step counts (sweep)")
  p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: config")
  arguments.add_cfg_interval_flag(p)
  arguments.add_clip_x0_flag(p)
  arguments.add_best_of_flag(p)
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--batch_size", type=int, default=d.batch_size)
  p.add_argument("--caption_tokens", type=int, default=d.caption_tokens, help="longest generated caption")
  p.add_argument("--text_records", type=int, default=d.text_records, help="held-out text records for ppl")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--no_ema", action="store_true", help="use raw params even if EMA params exist")
  p.add_argument("--shapesnet", default="", help="ShapesNet .npz (default WORKDIR/eval/shapesnet_<res>px.npz; "
                                                 "trained and saved there if missing)")
  p.add_argument("--inception_weights", default="", help="FID Inception .safetensors/.npz; adds fd_inception")
  p.add_argument("--mesh", type=_mesh_flag, default=None, metavar="AXIS=SIZE,...",
                 help="device mesh over data/fsdp/tensor, e.g. fsdp=8 (axes not named are 1, one may be -1 = "
                      "the rest), params sharded as in training; default: the first device only, or fsdp "
                      "over every device of several processes")
  distributed.add_argparse_flags(p)
  p.add_argument("--edits", type=int, default=0, help="score N edits of --split (an equal share per edit kind) "
                                                     "instead of the suite; guidance and steps: the first "
                                                     "--cfg_scales / --steps")
  p.add_argument("--edits_heldout", type=int, default=0, help="with --edits: also N edits of the heldout split")
  args = p.parse_args(argv)
  if args.edits < 0 or args.edits_heldout < 0:
    p.error(f"--edits and --edits_heldout must be >= 0, got {args.edits} and {args.edits_heldout}")
  try:
    distributed.check_flags(args.coordinator_address, args.num_processes, args.process_id)
  except distributed.DistributedError as e:
    p.exit(USAGE_ERROR, f"tfx.evaluate: error: {e}\n")  # one line, as tfx.train says it
  for name in ("num", "batch_size", "caption_tokens", "text_records"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.num_heldout < 0:
    p.error(f"--num_heldout must be >= 0, got {args.num_heldout}")
  if args.steps and min(args.steps) < 1:
    p.error(f"--steps must be >= 1, got {min(args.steps)}")
  if args.cfg_scales and not min(args.cfg_scales) >= 0:
    p.error(f"--cfg_scales must be >= 0, got {min(args.cfg_scales)}")
  if args.step is not None and args.step < 0:
    p.error(f"--step must be >= 0, got {args.step}")
  arguments.check_cfg_interval_flag(p, args.cfg_interval)
  arguments.check_clip_x0_flag(p, args.clip_x0)
  arguments.check_best_of_flag(p, args.best_of)
  if args.inception_weights and not os.path.isfile(args.inception_weights):
    p.error(f"--inception_weights {args.inception_weights} is not a file")
  if not fs.isdir(args.workdir):
    p.error(f"--workdir {args.workdir} does not exist")
  return args


def _cell(metrics: dict[str, float], key: str, fmt: str) -> str:
  v = metrics.get(key)
  if v is None:
    return "-"
  if fmt == "pct":
    return f"{v:.1%}"
  if fmt.startswith("pct2:"):
    other = metrics.get(fmt[5:])
    return f"{v:.1%}" + (f" / {other:.1%}" if other is not None else "")
  if fmt == "x100":
    return f"{100 * v:.1f}"
  return f"{v:.2f}"


def format_table(*columns: tuple[str, dict[str, float]]) -> str:
  """The headline metrics, one per line, one column per (name, metrics); names head the
  columns when there are several."""
  rows = [(label, [_cell(m, key, fmt) for _, m in columns]) for key, label, fmt in TABLE
          if any(key in m for _, m in columns)]
  sweeps = sorted({k for _, m in columns for k in m if k.startswith("t2i_pass@")})
  rows += [("text-to-image pass " + k.split("@")[1], [_cell(m, k, "pct") for _, m in columns]) for k in sweeps]
  if len(columns) > 1:
    rows.insert(0, ("", [name for name, _ in columns]))
  widths = [max(7, *(len(cells[i]) for _, cells in rows)) for i in range(len(columns))]
  return "\n".join(f"{label:<32}" + "  ".join(c.rjust(w) for c, w in zip(cells, widths)) for label, cells in rows)


def main(argv=None) -> int:
  args = parse_args(argv)
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  try:
    mesh = restore.cli_mesh(args.mesh)
  except mesh_lib.MeshError as e:
    print(f"tfx.evaluate: error: {e}", file=sys.stderr)
    return USAGE_ERROR
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    return _evaluate(args, mesh)


def _evaluate(args, mesh) -> int:
  try:
    config, model, step = restore.load(args.workdir, args.step, ema=not args.no_ema, mesh=mesh)
  except restore.RestoreError as e:
    print(f"tfx.evaluate: error: {e}", file=sys.stderr)
    return USAGE_ERROR
  if args.cfg_interval is not None:  # every mode samples with it, edits included
    config.diffusion.cfg_interval = tuple(args.cfg_interval)
  if args.clip_x0 is not None:
    config.diffusion.clip_x0 = args.clip_x0
  if args.best_of is not None:
    config.diffusion.best_of = args.best_of
  if args.edits:
    return _evaluate_edits(args, config, model, step)
  options = suite.Options(
      split=args.split, num=args.num, num_heldout=args.num_heldout,
      cfg_scales=tuple(args.cfg_scales or (config.diffusion.cfg_scale,)),
      steps=tuple(args.steps or (config.diffusion.sample_steps,)),
      sampler=args.sampler or config.diffusion.sampler,
      cfg_interval=tuple(config.diffusion.cfg_interval), clip_x0=float(config.diffusion.clip_x0),
      best_of=int(config.diffusion.best_of), seed=args.seed, batch_size=args.batch_size,
      caption_tokens=args.caption_tokens, text_records=args.text_records, inception=args.inception_weights,
      shapesnet=args.shapesnet or fs.join(args.workdir, results.EVAL_SUBDIR,
                                          f"shapesnet_{config.image.resolution}px.npz"))
  splits = [args.split]
  try:
    if not args.no_alt and args.split != eval_set.ALT_SPLIT and eval_set.has_alt(config):
      splits.append(eval_set.ALT_SPLIT)
    columns, paths = [], []
    gen = generate.Generator(config, model)   # compiled once for every split
    for split in splits:
      opts = dataclasses.replace(options, split=split)
      result = suite.run(config, model, opts, generator=gen)
      columns.append((split, result.metrics))
      if not distributed.is_chief():  # every process computed; process 0 writes and prints
        continue
      paths.append(results.write(args.workdir, step, result, opts, name="" if split == args.split else split))
      held = sum(p.held_out for p in result.pairs.prompts)
      print(f"step {step}: {len(result.pairs) - held} {split} pairs (rates below), {held} held-out "
            "(held-out rows)")
  except ValueError as e:
    print(f"tfx.evaluate: error: {e}", file=sys.stderr)
    return USAGE_ERROR
  if not distributed.is_chief():
    return 0
  print(format_table(*columns))
  for path in paths:
    print(f"wrote {path}")
  return 0


def _evaluate_edits(args, config, model, step: int) -> int:
  from tfx.eval import edits
  options = edits.Options(split=args.split, num=args.edits, num_heldout=args.edits_heldout, seed=args.seed,
                          steps=args.steps[0] if args.steps else None,
                          cfg_scale=args.cfg_scales[0] if args.cfg_scales else None, sampler=args.sampler)
  try:
    result = edits.run(config, model, options, log=lambda m: print(m, file=sys.stderr, flush=True))
  except ValueError as e:
    print(f"tfx.evaluate: error: {e}", file=sys.stderr)
    return USAGE_ERROR
  if not distributed.is_chief():  # every process computed; process 0 writes and prints
    return 0
  path = results.write_edits(args.workdir, step, result, options)
  print(f"step {step}: {len(result.edits)} edits of {args.split} (+ held-out)")
  print(edits.format_table(result.metrics))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
