"""tfx.lock: one trainer per workdir, local (flock) and on a URL (exclusive create)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tfx import fs, lock as lock_lib


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", ""])
  child.wait()
  return child.pid


@pytest.mark.parametrize("where", ["local", "memory"])
def test_second_holder_is_refused_and_release_frees(tmp_path, where):
  workdir = str(tmp_path) if where == "local" else f"memory://{tmp_path}/w"
  with lock_lib.WorkdirLock(workdir):
    holder = json.loads(fs.read_text(fs.join(workdir, lock_lib.LOCK_FILE)))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(lock_lib.WorkdirBusyError, match=rf"in use by another trainer \(host .*, pid {os.getpid()}, "
                       r"started \d{4}-"):
      lock_lib.WorkdirLock(workdir).acquire() if where == "memory" else _acquire_in_child(workdir)
  assert not fs.exists(fs.join(workdir, lock_lib.LOCK_FILE))
  with lock_lib.WorkdirLock(workdir):  # free again
    pass


def _acquire_in_child(workdir):
  """flock is per open file: a second process is what a second trainer is."""
  code = ("import sys; from tfx import lock\n"
          "try:\n  lock.WorkdirLock(sys.argv[1]).acquire()\n"
          "except lock.WorkdirBusyError as e:\n  print(e); sys.exit(3)\n")
  out = subprocess.run([sys.executable, "-c", code, workdir], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
  if out.returncode == 3:
    raise lock_lib.WorkdirBusyError(out.stdout.strip())
  raise AssertionError(out.stderr)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_stale_lock_on_this_host_is_taken_over_another_hosts_is_not(tmp_path, where):
  workdir = str(tmp_path) if where == "local" else f"memory://{tmp_path}/s"
  path = fs.join(workdir, lock_lib.LOCK_FILE)
  dead = _dead_pid()
  fs.write_text(path, json.dumps({"host": socket.gethostname(), "pid": dead, "started": "then"}))
  said = []
  with lock_lib.WorkdirLock(workdir, report=said.append):
    assert json.loads(fs.read_text(path))["pid"] == os.getpid()
  assert len(said) == 1 and f"pid {dead}, started then: that process is gone" in said[0]
  fs.write_text(path, json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
  with pytest.raises(lock_lib.WorkdirBusyError, match=r"locked by host elsewhere.*another host; if that run has "
                     r"ended, remove .*train.lock"):
    lock_lib.WorkdirLock(workdir).acquire()
  assert json.loads(fs.read_text(path))["host"] == "elsewhere"  # left as found
