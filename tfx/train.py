"""`python -m tfx.train --config=experiments/shapes.py --workdir=W`: flags, distributed init, trainer.run()."""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tfx import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment file with get_config(arg); `FILE.py:ARG` passes ARG; "
    "override any key with --config.a.b=v")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, config.json and metrics go")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, distributed.FLAG_HELP["coordinator_address"])
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, distributed.FLAG_HELP["num_processes"])
_PROCESS_ID = flags.DEFINE_integer("process_id", None, distributed.FLAG_HELP["process_id"])
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the memory/FLOPs report as JSON and exit")


def usage_error(message: str) -> None:
  """One line on stderr and exit code 2: command-line misuse."""
  print(f"tfx.train: error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_file(argv) -> str | None:
  """The --config=FILE[:ARG] file; the last one wins, as in absl."""
  files = [a.split("=", 1)[1].split(":", 1)[0] for a in argv[1:] if a.startswith("--config=")]
  return files[-1] if files else None


def _unknown_key_message(argv, error: Exception) -> str:
  key = str(error).strip("'\"")
  where = next((a for a in argv if a.startswith("--config.") and key in a.split("=", 1)[0]), None)
  return f"unknown config key {key!r}" + (f" in {where.split('=', 1)[0]}" if where else "")


def parse_flags(argv):
  """absl's parser, but bad input is one line and exit code 2 (not a traceback)."""
  path = _config_file(argv)
  if path is not None and not os.path.isfile(path):
    usage_error(f"config file {path} does not exist")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    usage_error(_unknown_key_message(argv, e))
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    usage_error(lines[-1] if lines else "bad flags")


def main(argv) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if len(argv) > 1:
    usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    usage_error("--config is required, e.g. --config=experiments/shapes.py")
  try:
    config = _CONFIG.value
    config.get("seed")  # a config file that failed to load raises here
  except OSError as e:
    usage_error(" ".join(str(e).split()))
  from tfx.model import presets
  try:  # --config.model.preset=NAME: NAME's sizes, then the other --config.model.* flags
    presets.apply_overrides(config, config_flags.get_override_values(flags.FLAGS["config"]))
  except ValueError as e:
    usage_error(str(e))
  if _DRY_RUN.value:
    from tfx import dryrun, mesh
    try:
      print(json.dumps(dryrun.report(config), indent=2))
    except (dryrun.DryRunError, mesh.MeshError) as e:
      usage_error(str(e))
    return
  if not _WORKDIR.value:
    usage_error("--workdir is required")
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except distributed.DistributedError as e:
    usage_error(str(e))
  from tfx import mesh, metrics, trainer
  try:
    result = trainer.run(config, _WORKDIR.value)
  except (trainer.ConfigError, mesh.MeshError) as e:
    usage_error(str(e))
  except metrics.NonFiniteLossError as e:
    print(f"tfx.train: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
