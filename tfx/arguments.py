"""argparse for the command-line tools (tfx.sample, tfx.evaluate, tfx.data.prepare): misuse is one line."""
import argparse
import sys

USAGE_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but an error is `PROG: error: MESSAGE` on one line (no usage block) and exit code 2;
  --help still prints the usage."""

  def error(self, message: str):
    print(f"{self.prog}: error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def add_cfg_interval_flag(p: argparse.ArgumentParser) -> None:
  """--cfg_interval LO HI: overrides config.diffusion.cfg_interval (tfx.sample, tfx.evaluate)."""
  p.add_argument("--cfg_interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                 help="guide only the denoising steps with t / (T - 1) in [LO, HI] (default: config)")


def _check_diffusion_flag(p: argparse.ArgumentParser, name: str, value) -> None:
  """Refuses a bad --NAME in one line, with the message diffusion.check_NAME gives for the config key."""
  if value is not None:
    from tfx import diffusion
    try:
      getattr(diffusion, f"check_{name}")(value)
    except ValueError as e:
      p.error(str(e).replace(f"diffusion.{name}", f"--{name}"))


def check_cfg_interval_flag(p: argparse.ArgumentParser, value) -> None:
  _check_diffusion_flag(p, "cfg_interval", value)


def add_clip_x0_flag(p: argparse.ArgumentParser) -> None:
  """--clip_x0 C: overrides config.diffusion.clip_x0 (tfx.sample, tfx.evaluate)."""
  p.add_argument("--clip_x0", type=float, default=None, metavar="C",
                 help="clip each denoising step's predicted x0 to [-C, C]; 0 = off (default: config)")


def check_clip_x0_flag(p: argparse.ArgumentParser, value) -> None:
  _check_diffusion_flag(p, "clip_x0", value)


def add_best_of_flag(p: argparse.ArgumentParser) -> None:
  """--best_of K: overrides config.diffusion.best_of (tfx.sample, tfx.evaluate)."""
  p.add_argument("--best_of", type=int, default=None, metavar="K",
                 help="draw K images per caption, keep the one the model reads likeliest as its caption "
                      "(default: config)")


def check_best_of_flag(p: argparse.ArgumentParser, value) -> None:
  _check_diffusion_flag(p, "best_of", value)
