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
