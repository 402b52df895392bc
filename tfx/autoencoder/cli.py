"""Command-line plumbing of the autoencoder entry points: --config files and one-line exit-2 errors."""
import os
import sys

from absl import flags, logging
from ml_collections import config_flags


def usage_error(prog: str, message: str) -> None:
  """One line on stderr and exit code 2: command-line misuse or unusable input."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def define_config_flag():
  return config_flags.DEFINE_config_file(
      "config", None, "experiment file with get_config(arg); `FILE.py:ARG` passes ARG; "
      "override any key with --config.a.b=v")


def flags_parser(prog: str):
  """absl's parser, but a missing config file or unknown key is one line and exit code 2."""
  def parse(argv):
    for arg in argv[1:]:
      if arg.startswith("--config="):
        path = arg.split("=", 1)[1].split(":", 1)[0]
        if not os.path.isfile(path):
          usage_error(prog, f"config file {path} does not exist")
    try:
      return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
      usage_error(prog, f"unknown config key {str(e).strip(chr(39) + chr(34))!r}")
    except flags.Error as e:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      usage_error(prog, lines[-1] if lines else "bad flags")
  return parse


def checked_config(prog: str, argv, config_flag):
  """The loaded config; exits 2 on stray arguments or a config file that does not load."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if len(argv) > 1:
    usage_error(prog, f"unexpected arguments: {' '.join(argv[1:])}")
  if config_flag.value is None:
    usage_error(prog, "--config is required, e.g. --config=experiments/shapes_vae.py")
  try:
    config = config_flag.value
    config.get("seed")  # a config file that failed to load raises here
  except OSError as e:
    usage_error(prog, " ".join(str(e).split()))
  return config
