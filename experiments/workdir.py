"""A run's workdir: one owner (`lock`, by flock), whole files (`atomic_write`)
and checkpoints verified by sha256 (`Checkpointer`). An I/O error names the
file and says that the run can resume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from absl import logging
import orbax.checkpoint as ocp

LOCK_FILE = ".lock"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
RESUMABLE = ("The run can resume: free space (or fix the file system) and "
             "rerun the same command; it continues from its last checkpoint.")


class WorkdirInUseError(RuntimeError):
  """Another process holds the workdir's lock."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored; the message says what to do."""


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


def atomic_write(path: str, payload: bytes) -> None:
  """Writes `path` whole or not at all (unique temp file, fsync, rename)."""
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
    fd = os.open(directory, os.O_RDONLY)      # makes the rename durable
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def check_path(path: str) -> str:
  """The absolute workdir path; ValueError if it or a parent is a file."""
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
  """Holds `fcntl.flock` on `<path>/.lock` (released however the process
  ends), or raises WorkdirInUseError naming the holder's pid and host. A
  directory this call created that holds only the lock on exit is removed."""
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


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(root: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, name), root)
                for d, _, names in os.walk(root) for name in names)


def read_manifest(directory: str) -> dict[str, Any]:
  """`<directory>.sha256.json`: {"metadata", "steps": {step: files}}."""
  path = os.path.abspath(directory) + ".sha256.json"
  if not os.path.exists(path):
    return {"metadata": None, "steps": {}}
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
    if not isinstance(manifest.get("steps"), dict):
      raise ValueError("no 'steps' entry")
  except (OSError, ValueError, AttributeError) as err:
    raise CheckpointError(
        f"{path}: cannot read the checkpoints' checksums ({err}). Restore "
        "the file from a copy, or use a new --workdir.") from err
  return manifest


class Checkpointer:
  """orbax steps in `directory` (async, the last two kept), each verified.

  Once a save completes, the sha256 of its files and `metadata` (the run's
  config) go to `<directory>.sha256.json`; an unrecorded step is not used.
  """

  def __init__(self, directory: str, metadata: Any = None):
    self.directory = os.path.abspath(directory)
    self.manifest_path = self.directory + ".sha256.json"
    self.metadata = metadata
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=2, create=True,
            enable_async_checkpointing=True))
    self._pending: int | None = None

  def _manifest(self) -> dict[str, dict[str, str]]:
    return read_manifest(self.directory)["steps"]

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, tree: Any) -> None:
    """Starts writing `tree` as step `step` (after finishing the last save)."""
    self.finish()
    with io_errors(self._step_dir(step), "saving the checkpoint"):
      self._manager.save(step, args=ocp.args.StandardSave(tree))
    self._pending = step

  def finish(self) -> None:
    """Waits for the save in flight, then records its files' sha256."""
    with io_errors(self.directory, "saving the checkpoint"):
      self._manager.wait_until_finished()
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    root = self._step_dir(step)
    steps = {str(s): v for s, v in self._manifest().items()
             if int(s) in self._manager.all_steps()}
    with io_errors(root, "reading the checkpoint"):
      steps[str(step)] = {name: _sha256(os.path.join(root, name))
                          for name in _files(root)}
    atomic_write(self.manifest_path, json.dumps(
        {"metadata": self.metadata, "steps": steps}, indent=1,
        sort_keys=True).encode("utf-8"))

  def close(self) -> None:
    """Finishes the save in flight and stops orbax's background threads."""
    try:
      self.finish()
    finally:
      self._manager.close()

  def latest_step(self) -> int | None:
    """The last step whose checksums were recorded; deletes those after it."""
    self.finish()
    recorded = {int(s) for s in self._manifest()}
    steps = [s for s in self._manager.all_steps() if s in recorded]
    unrecorded = sorted(set(self._manager.all_steps()) - recorded)
    if unrecorded:
      logging.warning("%s: step(s) %s have no checksums (interrupted while "
                      "saving) and are not used.", self.directory, unrecorded)
    latest = max(steps) if steps else None
    for s in self._manager.all_steps():          # to be written again
      if latest is None or s > latest:
        self._manager.delete(s)
    return latest

  def verify(self, step: int) -> None:
    """Raises CheckpointError unless every file of `step` has its sha256."""
    root = self._step_dir(step)
    expected = self._manifest().get(str(step))
    others = [s for s in self._manager.all_steps() if s < step]
    recover = (f"Delete {root} to resume from step {max(others)}, or use a "
               "new --workdir." if others else
               f"Delete {self.directory} and {self.manifest_path} to start "
               "over, or use a new --workdir.")
    if expected is None:
      raise CheckpointError(f"{root}: no checksums recorded in "
                            f"{self.manifest_path}. {recover}")
    found = _files(root)
    for name in sorted(set(expected) | set(found)):
      path = os.path.join(root, name)
      problem = (
          f"missing from the checkpoint of step {step}" if name not in found
          else f"not part of the checkpoint of step {step} as written"
          if name not in expected else "corrupted (its sha256 differs from "
          f"the one recorded when step {step} was saved)"
          if _sha256(path) != expected[name] else None)
      if problem:
        raise CheckpointError(f"{path}: {problem}. {recover}")

  def restore(self, step: int, target: Any) -> Any:
    """The tree of `step`, shaped like `target`, after `verify(step)`."""
    self.verify(step)
    try:
      return self._manager.restore(step,
                                   args=ocp.args.StandardRestore(target))
    except Exception as err:  # pylint: disable=broad-except
      raise CheckpointError(
          f"{self._step_dir(step)}: cannot restore the checkpoint "
          f"({type(err).__name__}: {err}). Use a new --workdir.") from err
