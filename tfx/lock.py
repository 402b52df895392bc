"""One trainer per workdir: WORKDIR/train.lock names its holder (host, pid, start time).

A local (or NFS-mounted) workdir is locked with flock(2) on the file, which the
kernel drops when the holder dies, however it dies; the file's text says who held
it. A lock file left with text by a dead process on this host is taken over with
a message; one left by another host is not (this host cannot see that host's
processes): the error says to remove it by hand. Where flock is not supported
(ENOLCK), and for URL workdirs (gs://, s3://, memory://), the file is created
exclusively (fsspec mode "xb": an atomic if-absent create on stores that support
it); a store without it falls back to check-then-write, which two trainers
starting in the same instant can both pass.
"""
import datetime
import errno
import json
import os
import socket

from tfx import fs

LOCK_FILE = "train.lock"


class WorkdirBusyError(RuntimeError):
  """Another trainer holds the workdir."""


def _me() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _describe(holder: dict) -> str:
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _parse(text: str) -> dict:
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _alive_here(holder: dict) -> bool | None:
  """Whether the holder process runs; None when it is on another host (unknowable)."""
  if holder.get("host") != socket.gethostname():
    return None
  try:
    os.kill(int(holder["pid"]), 0)
  except (ProcessLookupError, KeyError, ValueError, TypeError):
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """acquire() or WorkdirBusyError; release() removes the file. Also a context manager."""

  def __init__(self, workdir, *, report=print):
    self.workdir, self.path, self.report = workdir, fs.join(workdir, LOCK_FILE), report
    self._fd = None
    self._held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def _busy(self, holder: dict) -> WorkdirBusyError:
    return WorkdirBusyError(f"workdir {self.workdir} is in use by another trainer ({_describe(holder)}); "
                            f"wait for it to end or use another --workdir")

  def _stale(self, holder: dict, *, unlocked: bool = False) -> None:
    """Takes over a lock whose holder is gone; WorkdirBusyError when that cannot be known.

    `unlocked`: this process holds the file's flock, so no process on this host holds it.
    """
    alive = _alive_here(holder)
    if unlocked and alive is not None:
      alive = False  # the pid may be reused; the flock says its holder is gone
    if alive:
      raise self._busy(holder)
    if alive is None:
      raise WorkdirBusyError(
          f"workdir {self.workdir} is locked by {_describe(holder)}, another host; if that run has "
          f"ended, remove {self.path} and rerun")
    self.report(f"taking over the stale lock of {self.workdir} ({_describe(holder)}: that process is gone)")

  def acquire(self) -> None:
    fs.makedirs(self.workdir)
    if fs.is_local(self.path) and self._acquire_flock():
      return
    self._acquire_exclusive_create()

  def _acquire_flock(self) -> bool:
    """False when the filesystem has no flock (then the exclusive-create path runs)."""
    import fcntl
    path = os.path.abspath(self.path)
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise self._busy(holder) from None
        return False  # ENOLCK etc.
      try:  # the holder may have released (removed the file) while we waited: lock the new one
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = os.pread(fd, 4096, 0).decode(errors="replace")
    if previous.strip():
      try:
        self._stale(_parse(previous), unlocked=True)
      except WorkdirBusyError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_me()).encode(), 0)
    os.fsync(fd)
    self._fd, self._held = fd, True
    return True

  def _acquire_exclusive_create(self) -> None:
    for attempt in range(2):
      try:
        with fs.open(self.path, "xb") as f:
          f.write(json.dumps(_me()).encode())
        self._held = True
        return
      except FileExistsError:
        if attempt:
          raise self._busy(_parse(fs.read_text(self.path))) from None
        self._stale(_parse(fs.read_text(self.path)))
        fs.remove(self.path)
      except (ValueError, NotImplementedError):  # no exclusive create on this store
        if fs.exists(self.path):
          self._stale(_parse(fs.read_text(self.path)))
        fs.write_text(self.path, json.dumps(_me()))
        self._held = True
        return

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    try:
      if self._fd is not None:  # remove while still locked: a waiter then sees a new inode
        os.remove(os.path.abspath(self.path))
      else:
        fs.remove(self.path)
    except FileNotFoundError:
      pass
    finally:
      if self._fd is not None:
        os.close(self._fd)
        self._fd = None
