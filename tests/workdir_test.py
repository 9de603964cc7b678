"""Tests of experiments.workdir: the lock, atomic writes and I/O errors."""

import errno
import os
import signal
import socket
import subprocess
import sys

import pytest

from experiments import workdir


def test_a_second_holder_is_refused_with_the_pid_and_host(tmp_path):
  path = str(tmp_path / "run")
  with workdir.lock(path):
    # flock locks belong to an open file: a second open conflicts even in
    # the same process, as a second process would.
    with pytest.raises(workdir.WorkdirInUseError,
                       match=rf"{path} is in use by another run \(pid "
                       rf"{os.getpid()} on host {socket.gethostname()}"):
      with workdir.lock(path):
        pass
    with open(os.path.join(path, "kept"), "w", encoding="utf-8") as f:
      f.write("x")
  with workdir.lock(path):      # released on exit
    pass
  assert sorted(os.listdir(path)) == [workdir.LOCK_FILE, "kept"]


def test_a_failed_start_leaves_no_workdir(tmp_path):
  path = str(tmp_path / "run")
  with pytest.raises(RuntimeError, match="boom"):
    with workdir.lock(path):
      raise RuntimeError("boom")
  assert not os.path.exists(path)


def test_a_killed_holder_never_blocks_a_rerun(tmp_path):
  path = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time; from experiments import workdir\n"
       f"with workdir.lock({path!r}):\n"
       "  print('locked', flush=True); time.sleep(60)"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir.WorkdirInUseError, match=f"pid {holder.pid}"):
      with workdir.lock(path):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir.lock(path):
    pass


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / "f").write_text("x")
  for path in (tmp_path / "f", tmp_path / "f" / "sub"):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'f'} is a file, not "
                       "a directory.*--workdir="):
      workdir.check_path(str(path))
  assert workdir.check_path(str(tmp_path / "new" / "run")) == str(
      tmp_path / "new" / "run")


def test_atomic_write_is_whole_or_nothing(tmp_path, monkeypatch):
  path = str(tmp_path / "summary.json")
  workdir.atomic_write(path, b"old")
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match=rf"{path}: writing failed \(No space "
                     r"left on device\)\. The run can resume") as info:
    workdir.atomic_write(path, b"new")
  assert info.value.errno == errno.ENOSPC
  with open(path, "rb") as f:
    assert f.read() == b"old"
  assert os.listdir(tmp_path) == ["summary.json"]   # no temporary left


def test_temporary_files_have_unique_names(tmp_path, monkeypatch):
  names = []
  real_replace = os.replace

  def spy(src, dst):
    names.append(os.path.basename(src))
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", spy)
  for _ in range(3):
    workdir.atomic_write(str(tmp_path / "a.json"), b"{}")
  assert len(set(names)) == 3 and all(n.startswith("a.json.") for n in names)
