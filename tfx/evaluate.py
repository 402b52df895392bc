"""`python -m tfx.evaluate --workdir=W`: scores a trained checkpoint with tfx.eval.suite.

Writes WORKDIR/eval/<step>.json (metrics, options, every generated caption with its
reference), a PNG grid of the first 24 generated images beside it (prompts listed in the
JSON), TensorBoard scalars under WORKDIR/tensorboard (tag eval/<metric>), and prints a
short table. Sweeps: several --cfg_scales and/or --steps evaluate text-to-image once per
combination. --mesh shards the params over a device mesh as in training (a checkpoint
too large for one device).
"""
import argparse
import contextlib
import os
import sys

import jax

from tfx import fs, mesh as mesh_lib, restore
from tfx.eval import results, suite

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
  p = argparse.ArgumentParser(prog="python -m tfx.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  d = suite.Options()
  p.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints)")
  p.add_argument("--split", default=d.split, help="image-caption split to evaluate")
  p.add_argument("--num", type=int, default=d.num, help="pairs of --split (equal share per caption kind)")
  p.add_argument("--num_heldout", type=int, default=d.num_heldout, help="pairs of held-out combinations")
  p.add_argument("--cfg_scales", type=float, nargs="+", default=None, help="guidance scales (sweep)")
  p.add_argument("--steps", type=int, nargs="+", default=None, help="denoising step counts (sweep)")
  p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: config")
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
                      "the rest), params sharded as in training; default: the first device only")
  args = p.parse_args(argv)
  for name in ("num", "batch_size", "caption_tokens", "text_records"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.num_heldout < 0:
    p.error(f"--num_heldout must be >= 0, got {args.num_heldout}")
  if args.steps and min(args.steps) < 1:
    p.error(f"--steps must be >= 1, got {min(args.steps)}")
  if args.inception_weights and not os.path.isfile(args.inception_weights):
    p.error(f"--inception_weights {args.inception_weights} is not a file")
  if not fs.isdir(args.workdir):
    p.error(f"--workdir {args.workdir} does not exist")
  return args


def format_table(metrics: dict[str, float]) -> str:
  """The headline metrics, one per line."""
  lines = []
  for key, label, fmt in TABLE:
    if key not in metrics:
      continue
    v = metrics[key]
    if fmt == "pct":
      text = f"{v:7.1%}"
    elif fmt.startswith("pct2:"):
      other = metrics.get(fmt[5:])
      text = f"{v:7.1%}" + (f" / {other:.1%}" if other is not None else "")
    elif fmt == "x100":
      text = f"{100 * v:7.1f}"
    else:
      text = f"{v:7.2f}"
    lines.append(f"{label:<32}{text}")
  sweeps = sorted(k for k in metrics if k.startswith("t2i_pass@"))
  lines += [f"{'text-to-image pass ' + k.split('@')[1]:<32}{metrics[k]:7.1%}" for k in sweeps]
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    mesh = None if args.mesh is None else mesh_lib.make_mesh(args.mesh)
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
  options = suite.Options(
      split=args.split, num=args.num, num_heldout=args.num_heldout,
      cfg_scales=tuple(args.cfg_scales or (config.diffusion.cfg_scale,)),
      steps=tuple(args.steps or (config.diffusion.sample_steps,)),
      sampler=args.sampler or config.diffusion.sampler,
      seed=args.seed, batch_size=args.batch_size, caption_tokens=args.caption_tokens,
      text_records=args.text_records, inception=args.inception_weights,
      shapesnet=args.shapesnet or fs.join(args.workdir, results.EVAL_SUBDIR,
                                          f"shapesnet_{config.image.resolution}px.npz"))
  try:
    result = suite.run(config, model, options)
  except ValueError as e:
    print(f"tfx.evaluate: error: {e}", file=sys.stderr)
    return USAGE_ERROR
  path = results.write(args.workdir, step, result, options)
  held = sum(p.held_out for p in result.pairs.prompts)
  print(f"step {step}: {len(result.pairs) - held} {args.split} pairs (rates below), {held} held-out "
        "(held-out rows)")
  print(format_table(result.metrics))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
