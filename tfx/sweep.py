"""`python -m tfx.sweep --config=experiments/X.py --grid=KEY=v1,v2 --workdir=ROOT`: a grid of runs,
evaluated at several checkpoints, into a table, plots against training FLOPs and parity ratios.

Each variant trains in ROOT/<variant> (tfx.trainer) and is evaluated at --eval_steps (default:
its checkpoint steps) by tfx.eval.suite into ROOT/<variant>/eval/<step>.json; then ROOT/report/
gets README.md (table, parity FLOP ratios), one <metric>.png per metric and points.json.
Variants run one after another, or --jobs=N at a time as child processes (one accelerator
shared, or the CPU cores); a rerun skips finished variants and continues stopped ones.
--report_only redraws the report from the recorded JSON; --print_commands prints one training
command per variant (for launch/gpu_slurm.sh or launch/tpu_pod.sh with --launcher) instead.
docs/experiments.md has the switches and the parity ratio's definition.
"""
import argparse
import json
import subprocess
import sys
import tempfile

from tfx import fs
from tfx.sweeps import spec

USAGE_ERROR = 2
SWEEP_FILE = "sweep.json"   # ROOT/sweep.json: the variants and their overrides, for --report_only


def _ints(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of steps") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: steps must be >= 1")
  return values


def _pair(text: str) -> tuple[str, str]:
  a, comma, b = text.partition(",")
  if not comma or not a or not b or "," in b:
    raise argparse.ArgumentTypeError(f"{text!r} is not A,B (two variant names or globs)")
  return a, b


def _names(text: str) -> list[str]:
  return [v for v in text.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m tfx.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="experiment file FILE.py[:ARG], as tfx.train takes it")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                 help="a config key and its values (repeat: the cartesian product)")
  p.add_argument("--sweep", help="sweep file (.py or .json): VARIANTS = {name: {key: value}}")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="an override for every variant (e.g. total_steps=2000)")
  p.add_argument("--workdir", required=True, help="ROOT: one folder per variant, and report/")
  p.add_argument("--eval_steps", type=_ints, default=None, metavar="S1,S2",
                 help="steps to evaluate (default: every checkpoint step); total_steps always")
  d = _eval_defaults()
  p.add_argument("--eval_num", type=int, default=d.num, help="test pairs per evaluation")
  p.add_argument("--eval_num_heldout", type=int, default=d.num_heldout, help="held-out pairs per evaluation")
  p.add_argument("--eval_text_records", type=int, default=d.text_records, help="held-out text records (ppl)")
  p.add_argument("--eval_caption_tokens", type=int, default=d.caption_tokens, help="longest generated caption")
  p.add_argument("--eval_batch_size", type=int, default=d.batch_size)
  p.add_argument("--shapesnet", default="", help="ShapesNet .npz for fd_shapesnet (default "
                                                  "ROOT/shapesnet_<res>px.npz, trained once if missing)")
  p.add_argument("--inception_weights", default="", help="FID Inception weights; adds fd_inception")
  p.add_argument("--metrics", type=_names, default=None, help="table columns (default: the headline metrics)")
  p.add_argument("--plot_metrics", type=_names, default=None, help="metrics to plot (default: every one)")
  p.add_argument("--parity", type=_pair, action="append", default=[], metavar="A,B",
                 help="FLOPs B needs to match A's best, over A's (variant names or globs; repeat)")
  p.add_argument("--parity_metrics", type=_names, default=None, help="default: the table's columns")
  p.add_argument("--jobs", type=int, default=1, help="variants trained at once, each in its own "
                 "process sharing the accelerator (output in ROOT/logs/<variant>.log)")
  p.add_argument("--only", type=_names, default=None, metavar="NAME,NAME",
                 help="run only these variants (no report; a run without --only writes it)")
  p.add_argument("--report_only", action="store_true", help="only redraw ROOT/report from recorded JSON")
  p.add_argument("--print_commands", action="store_true", help="print one training command per variant")
  p.add_argument("--launcher", default="", help='with --print_commands: e.g. "launch/gpu_slurm.sh '
                                                 '--nodes=1 --gpus_per_node=8" (variant flags go after --)')
  args = p.parse_args(argv)
  if not args.report_only and not args.config:
    p.error("--config is required (except with --report_only)")
  if args.grid and args.sweep:
    p.error("give --grid or --sweep, not both")
  if not args.report_only and not (args.grid or args.sweep):
    p.error("give the variants: --grid=KEY=V1,V2 (repeatable) or --sweep=FILE")
  for name in ("eval_num", "eval_text_records", "eval_caption_tokens", "eval_batch_size", "jobs"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  return args


def _eval_defaults():
  from tfx.eval import suite
  return suite.Options()


def _variants(args, base) -> list[spec.Variant]:
  if args.sweep:
    return spec.load_sweep_file(args.sweep)
  return spec.grid_variants(spec.parse_assignments(base, args.grid, many=True))


def _recorded_names(root: str) -> list[str]:
  """The variants ROOT/sweep.json lists, else every folder of ROOT with evaluations."""
  path = fs.join(root, SWEEP_FILE)
  if fs.exists(path):
    return [v["name"] for v in json.loads(fs.read_text(path))["variants"]]
  return [n for n in fs.listdir(root) if fs.isdir(fs.join(root, n, "eval"))] if fs.isdir(root) else []


def _report(args, names) -> int:
  from tfx.sweeps import report
  try:
    path = report.write(args.workdir, names, columns=args.metrics, plots=args.plot_metrics,
                        parity_pairs=args.parity, parity_metrics=args.parity_metrics)
  except ValueError as e:
    print(f"tfx.sweep: error: {e}", file=sys.stderr)
    return USAGE_ERROR
  print(fs.read_text(path))
  print(f"wrote {path}")
  return 0


def _shapesnet(args, root: str, config) -> str:
  return args.shapesnet or fs.join(root, f"shapesnet_{config.image.resolution}px.npz")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  root = args.workdir
  variants, common, configs = [], {}, {}
  try:
    if args.config:
      base = spec.load_config(args.config)
      common = {k: vs[0] for k, vs in spec.parse_assignments(base, args.set, many=False)}
      variants = _variants(args, base) if (args.grid or args.sweep) else []
      configs = {v.name: spec.apply(base, {**common, **v.overrides}) for v in variants}
    if args.only:
      unknown = sorted(set(args.only) - {v.name for v in variants})
      if unknown:
        raise spec.SweepError(f"--only names no variant of this sweep: {', '.join(unknown)}")
      variants = [v for v in variants if v.name in args.only]
  except spec.SweepError as e:
    print(f"tfx.sweep: error: {e}", file=sys.stderr)
    return USAGE_ERROR
  if args.report_only:
    return _report(args, [v.name for v in variants] or _recorded_names(root))
  if args.print_commands:
    for v in variants:
      print(spec.train_command(args.config, fs.join(root, v.name), {**common, **v.overrides}, args.launcher))
    return 0
  fs.makedirs(root)
  if not args.only:  # a child of --jobs, or a user's --only, runs part of the sweep that this file lists
    fs.write_text(fs.join(root, SWEEP_FILE), json.dumps(
        {"config": args.config, "common": common,
         "variants": [{"name": v.name, "overrides": v.overrides} for v in variants]}, indent=1, default=str))
  if args.jobs > 1 and len(variants) > 1:
    status = _run_side_by_side(args, argv, root, variants, configs)
  else:
    status = _run(args, root, variants, configs)
  return status if status or args.only else _report(args, [v.name for v in variants])


def _run(args, root, variants, configs) -> int:
  """The variants one after another, in this process."""
  from tfx import trainer
  from tfx.eval import suite
  from tfx.sweeps import runner
  for v in variants:
    config = configs[v.name]
    options = suite.Options(
        num=args.eval_num, num_heldout=args.eval_num_heldout, text_records=args.eval_text_records,
        caption_tokens=args.eval_caption_tokens, batch_size=args.eval_batch_size,
        inception=args.inception_weights,
        shapesnet=_shapesnet(args, root, config))
    workdir = fs.join(root, v.name)
    try:
      outcome = runner.run_variant(config, workdir, runner.eval_steps(config, args.eval_steps), options)
    except trainer.ConfigError as e:
      print(f"tfx.sweep: error: variant {v.name}: {e}", file=sys.stderr)
      return USAGE_ERROR
    print(f"tfx.sweep: {v.name}: {'finished before; skipped' if outcome == 'skipped' else 'done'}",
          file=sys.stderr)
  return 0


def _run_side_by_side(args, argv, root, variants, configs) -> int:
  """Each variant in a child `tfx.sweep --only=NAME`, --jobs at once (the report is the caller's)."""
  from tfx.sweeps import parallel
  env = parallel.child_env(args.jobs)
  # The ShapesNet is trained once, before the children, so that two never train it at once;
  # in a child process, so that this one holds no accelerator memory while they run.
  for path, resolution in sorted({(_shapesnet(args, root, c), c.image.resolution) for c in configs.values()}):
    if not fs.exists(path):
      trained = subprocess.run([sys.executable, "-c", "import sys; from tfx.eval import suite; "
                                "suite.load_or_train_shapesnet(sys.argv[1], int(sys.argv[2]))", path,
                                str(resolution)], env=env)
      if trained.returncode != 0:
        print(f"tfx.sweep: training the ShapesNet into {path} failed (exit code {trained.returncode})",
              file=sys.stderr)
        return 1
  log_dir = fs.join(root, "logs") if fs.is_local(root) else tempfile.mkdtemp(prefix="tfx_sweep_logs_")
  commands = {v.name: [sys.executable, "-m", "tfx.sweep", *argv, f"--only={v.name}", "--jobs=1"]
              for v in variants}
  codes = parallel.run(commands, args.jobs, log_dir, env=env,
                       log=lambda msg: print(f"tfx.sweep: {msg}", file=sys.stderr, flush=True))
  failed = [name for name, code in codes.items() if code != 0]
  if failed:
    print(f"tfx.sweep: {len(failed)} of {len(codes)} variants failed ({', '.join(failed)}; logs in "
          f"{log_dir}); rerunning the same command continues them", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
