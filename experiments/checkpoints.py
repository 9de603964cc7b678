"""Checkpoints through orbax, with a sha256 of every file to catch corruption.

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(step, tree)                  # after each chunk
    step = ckpt.latest_step()              # None when there is none
    tree = ckpt.restore(step, target)      # verified first

orbax writes each step atomically into `<directory>/<step>/`, asynchronously
(as in the flax examples), and keeps the last two. Orbax does not checksum,
so once a save completes this module records the sha256 of its files, and the
config it was trained with (`metadata`), in `<directory>.sha256.json`;
`restore` verifies them first, and an unrecorded step is not used.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from absl import logging
import orbax.checkpoint as ocp

from experiments import workdir as workdir_lib


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored; the message says what to do."""


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
  """`<directory>.sha256.json`: {"metadata", "steps": {step: files}}, or empty.

  Raises:
    CheckpointError: for a manifest that cannot be read, naming it.
  """
  path = os.path.abspath(directory) + ".sha256.json"
  if not os.path.exists(path):
    return {"metadata": None, "steps": {}}
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
    if all(key.isdigit() for key in manifest):      # written before metadata
      manifest = {"metadata": None, "steps": manifest}
    if not isinstance(manifest.get("steps"), dict):
      raise ValueError("no 'steps' entry")
  except (OSError, ValueError, AttributeError) as err:
    raise CheckpointError(
        f"{path}: cannot read the checkpoints' checksums ({err}). Restore "
        "the file from a copy, or use a new --workdir.") from err
  return manifest


class Checkpointer:
  """Saves and restores pytrees by step, verifying each file's sha256.

  Attributes:
    directory: where orbax writes the steps.
    manifest_path: `<directory>.sha256.json`.
    metadata: a JSON-able value recorded beside the checksums (the run's
      config), or None.
  """

  def __init__(self, directory: str, max_to_keep: int = 2,
               metadata: Any = None):
    self.directory = os.path.abspath(directory)
    self.manifest_path = self.directory + ".sha256.json"
    self.metadata = metadata
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=True))
    self._pending: int | None = None

  def _manifest(self) -> dict[str, dict[str, str]]:
    return read_manifest(self.directory)["steps"]

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, tree: Any) -> None:
    """Starts writing `tree` as step `step` (after finishing the last save)."""
    self.finish()
    with workdir_lib.io_errors(self._step_dir(step), "saving the checkpoint"):
      self._manager.save(step, args=ocp.args.StandardSave(tree))
    self._pending = step

  def finish(self) -> None:
    """Waits for the save in flight, then records its files' sha256."""
    with workdir_lib.io_errors(self.directory, "saving the checkpoint"):
      self._manager.wait_until_finished()
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    root = self._step_dir(step)
    steps = {str(s): v for s, v in self._manifest().items()
             if int(s) in self._manager.all_steps()}
    with workdir_lib.io_errors(root, "reading the checkpoint"):
      steps[str(step)] = {name: _sha256(os.path.join(root, name))
                          for name in _files(root)}
    workdir_lib.atomic_write(self.manifest_path, json.dumps(
        {"metadata": self.metadata, "steps": steps}, indent=1,
        sort_keys=True).encode("utf-8"))

  def close(self) -> None:
    """Finishes the save in flight and stops orbax's background threads."""
    try:
      self.finish()
    finally:
      self._manager.close()

  def latest_step(self) -> int | None:
    """The last step whose checksums were recorded, or None."""
    self.finish()
    recorded = {int(s) for s in self._manifest()}
    steps = [s for s in self._manager.all_steps() if s in recorded]
    unrecorded = sorted(set(self._manager.all_steps()) - recorded)
    if unrecorded:
      logging.warning("%s: step(s) %s have no checksums (interrupted while "
                      "saving) and are not used.", self.directory, unrecorded)
    return max(steps) if steps else None

  def discard_after(self, step: int) -> None:
    """Deletes the steps after `step` (-1: all), to be written again."""
    for s in self._manager.all_steps():
      if s > step:
        self._manager.delete(s)

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
      if name not in found:
        raise CheckpointError(f"{path}: missing from the checkpoint of step "
                              f"{step}. {recover}")
      if name not in expected:
        raise CheckpointError(f"{path}: not part of the checkpoint of step "
                              f"{step} as written. {recover}")
      if _sha256(path) != expected[name]:
        raise CheckpointError(
            f"{path}: corrupted (its sha256 differs from the one recorded "
            f"when step {step} was saved). {recover}")

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
