"""The workdir of a run: one owner at a time, and files that are whole.

    with workdir.lock(path):                 # refuses a second process
      workdir.atomic_write(os.path.join(path, "summary.json"), payload)

`lock` holds `fcntl.flock` on `<workdir>/.lock` (released by the kernel
however the process ends; a second process is refused with the holder's pid
and host). `atomic_write` leaves the old file or the new one, never a torn
one; an I/O error names the file and says that the run can resume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import tempfile
import time
from collections.abc import Iterator

LOCK_FILE = ".lock"

_UMASK = os.umask(0o022)
os.umask(_UMASK)

#: What an I/O error in the workdir adds to its message.
RESUMABLE = ("The run can resume: free space (or fix the file system) and "
             "rerun the same command; it continues from its last checkpoint.")


class WorkdirInUseError(RuntimeError):
  """Another process holds the workdir's lock."""


@contextlib.contextmanager
def io_errors(path: str, what: str = "writing") -> Iterator[None]:
  """Re-raises an OSError while `what` `path` as one naming it and the fix."""
  try:
    yield
  except OSError as err:
    if getattr(err, "filename", None) == path and "resume" in str(err):
      raise
    reason = os.strerror(err.errno) if err.errno else str(err)
    raise OSError(err.errno, f"{path}: {what} failed ({reason}). "
                  f"{RESUMABLE}", path) from err


def fsync_directory(directory: str) -> None:
  """Makes the renames in `directory` durable."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write(path: str, payload: bytes) -> None:
  """Writes `path` whole or not at all (unique temp file, fsync, rename).

  Raises:
    OSError: naming `path`, and saying the run can resume.
  """
  directory = os.path.dirname(os.path.abspath(path))
  with io_errors(path):
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                               suffix=".tmp", dir=directory)
    try:
      os.fchmod(fd, 0o666 & ~_UMASK)          # what open() would have given
      with os.fdopen(fd, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise
    fsync_directory(directory)


def check_path(path: str) -> str:
  """The absolute workdir path; refuses one that is a file. Creates nothing.

  Raises:
    ValueError: when `path` or one of its parents is a file, with the fix.
  """
  path = os.path.abspath(os.path.expanduser(path))
  parent = path
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise ValueError(
        f"--workdir={path}: {parent} is a file, not a directory. Pass a "
        "directory path (it is created if needed), e.g. "
        f"--workdir={os.path.join(os.path.dirname(parent), 'runs', 'run1')}.")
  return path


@contextlib.contextmanager
def lock(path: str) -> Iterator[None]:
  """Holds an exclusive lock on the workdir `path` (created if needed).

  A directory this call created that holds only the lock file on exit is
  removed again.

  Raises:
    WorkdirInUseError: at once, when another process holds the lock.
  """
  created = not os.path.exists(path)
  with io_errors(path, "creating the workdir"):
    os.makedirs(path, exist_ok=True)
  lock_path = os.path.join(path, LOCK_FILE)
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  acquired = False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
      if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        raise
      holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
      raise WorkdirInUseError(
          f"--workdir={path} is in use by another run "
          f"({holder or 'a process that is just starting'}; lock "
          f"{lock_path}). Wait for it to finish, stop it, or pass another "
          "--workdir.") from None
    acquired = True
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"pid {os.getpid()} on host {socket.gethostname()}, "
                   f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(),
              0)
    yield
  finally:
    os.close(fd)        # releases the lock
    if acquired and created and os.listdir(path) == [LOCK_FILE]:
      with contextlib.suppress(OSError):
        os.unlink(lock_path)
        os.rmdir(path)
