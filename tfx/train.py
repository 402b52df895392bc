"""`python -m tfx.train --config=experiments/shapes.py --workdir=W`: flags, distributed init, trainer.run()."""
import errno
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
_ALLOW_CHANGE = flags.DEFINE_list(
    "allow_config_change", [], "resume even though these config keys (e.g. global_batch_size,seq_len) "
    "differ from the workdir's config.json")

# Exit codes besides 0: 1 non-finite loss, 2 command-line misuse (bad flags, config, busy workdir),
# 74 (sysexits EX_IOERR) a checkpoint or workdir file could not be written, 75 no checkpoint restores.
IO_ERROR = 74
DAMAGED = 75


def usage_error(message: str) -> None:
  """One line on stderr and exit code 2: command-line misuse."""
  print(f"tfx.train: error: {message}", file=sys.stderr)
  sys.exit(2)


# OS errors of a write that a rerun on a healthy disk would not hit: reported in one line, exit 74
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def _write_error_line(e: OSError) -> str | None:
  """One line for a checkpoint or workdir write that failed; None for other OS errors."""
  from tfx import checkpoint
  if isinstance(e, checkpoint.CheckpointWriteError):
    return str(e)
  if e.errno in _WRITE_ERRNOS:
    return f"cannot write{f' {e.filename}' if e.filename else ''}: {e.strerror or e}"
  return None


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
  from tfx import checkpoint, lock, mesh, metrics, trainer
  try:
    result = trainer.run(config, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
  except (trainer.ConfigError, mesh.MeshError, lock.WorkdirBusyError) as e:
    usage_error(str(e))
  except metrics.NonFiniteLossError as e:
    print(f"tfx.train: {e}", file=sys.stderr)
    sys.exit(1)
  except checkpoint.DamagedCheckpointError as e:
    print(f"tfx.train: {e}", file=sys.stderr)
    sys.exit(DAMAGED)
  except OSError as e:  # CheckpointWriteError, or config.json / metrics.jsonl on a full disk
    line = _write_error_line(e)
    if line is None:
      raise
    print(f"tfx.train: {line}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Orbax's save threads still hold the failed write; a normal interpreter exit would print
    # their teardown tracebacks. The earlier checkpoints are complete on disk.
    os._exit(IO_ERROR)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
