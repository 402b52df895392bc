"""Variants side by side: one child process per variant, at most `jobs` at once.

A small model leaves one accelerator mostly idle, so a sweep of them runs several at a time:
each child gets an equal share of the memory XLA preallocates (75% per process by default,
so two children would not fit), and on CPU the children share the cores. Each child's
output goes to its own log file; the caller learns each exit code.
"""
import os
import subprocess
import time
from typing import Callable

MEMORY_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def child_env(jobs: int, env: dict | None = None) -> dict:
  """`env` (default os.environ) with an accelerator memory share per child, unless one is set."""
  env = dict(os.environ if env is None else env)
  env.setdefault(MEMORY_FRACTION, f"{0.9 / jobs:.3f}")
  return env


def run(commands: dict[str, list[str]], jobs: int, log_dir: str, *, log: Callable[[str], None],
        env: dict | None = None, poll_s: float = 0.2) -> dict[str, int]:
  """Runs each name's command, at most `jobs` at a time, output to LOG_DIR/<name>.log.

  Returns name -> exit code. An interrupt (Ctrl-C) terminates the running children: a rerun of
  the sweep continues them from their checkpoints.
  """
  os.makedirs(log_dir, exist_ok=True)
  pending, running, codes = list(commands.items()), {}, {}
  try:
    while pending or running:
      while pending and len(running) < jobs:
        name, command = pending.pop(0)
        path = os.path.join(log_dir, f"{name}.log")
        out = open(path, "w")  # noqa: SIM115 - closed when the child ends
        running[name] = (subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env), out, path)
        log(f"{name}: started, log {path}")
      for name, (child, out, path) in list(running.items()):
        if child.poll() is None:
          continue
        out.close()
        del running[name]
        codes[name] = child.returncode
        log(f"{name}: " + ("finished" if child.returncode == 0
                           else f"failed with exit code {child.returncode}; its log: {path}"))
      if running:
        time.sleep(poll_s)
  finally:
    for child, out, _ in running.values():
      child.terminate()
      child.wait()
      out.close()
  return codes
