"""Atomic writes keep the old file on failure and leave recognisable leftovers only."""

import os

import pytest

from spatial_jax import fileio


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "a.json"
  fileio.write_atomic(path, b"old")
  with pytest.raises(RuntimeError), fileio.atomic_writer(path) as f:
    f.write(b"half")
    raise RuntimeError("killed")
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["a.json"]
  fileio.write_atomic(path, b"new")
  assert path.read_bytes() == b"new" and oct(path.stat().st_mode & 0o777) == "0o644"


def test_leftover_names():
  assert fileio.is_leftover(".img_1.png.k3j_9x.tmp")
  assert not fileio.is_leftover("img.tmp-1.png")
  assert not fileio.is_leftover("a.tmp")


def test_atomic_directory_swaps_in_a_whole_folder_or_nothing(tmp_path):
  target = tmp_path / "final"
  with fileio.atomic_directory(target) as tmp:
    assert fileio.is_leftover(os.path.basename(tmp)) and not target.exists()
    (open(os.path.join(tmp, "a"), "w")).write("old")
  assert os.listdir(target) == ["a"] and oct(target.stat().st_mode & 0o777) == "0o755"
  with pytest.raises(RuntimeError), fileio.atomic_directory(target) as tmp:
    (open(os.path.join(tmp, "b"), "w")).write("half")
    raise RuntimeError("killed")
  assert os.listdir(target) == ["a"] and os.listdir(tmp_path) == ["final"]
  with fileio.atomic_directory(target) as tmp:
    (open(os.path.join(tmp, "b"), "w")).write("new")
  assert os.listdir(target) == ["b"] and os.listdir(tmp_path) == ["final"]


def test_workdir_lock_refuses_a_second_run_and_names_the_holder(tmp_path):
  with fileio.workdir_lock(tmp_path, "grpo"):
    holder = (tmp_path / fileio.LOCK_FILE).read_text()
    assert '"job": "grpo"' in holder and f'"pid": {os.getpid()}' in holder
    # Another open file description of the same lock file conflicts, as a second process would.
    with pytest.raises(
      fileio.WorkdirBusyError, match=f"in use by another run .*grpo.*{os.getpid()}"
    ):
      with fileio.workdir_lock(tmp_path, "sample"):
        pass
  with fileio.workdir_lock(tmp_path, "sample"):  # Released: the next run takes it.
    assert '"job": "sample"' in (tmp_path / fileio.LOCK_FILE).read_text()


def test_workdir_lock_of_a_dead_process_is_taken_over(tmp_path):
  import subprocess
  import sys

  code = (
    "import os, sys; from spatial_jax import fileio\n"
    "with fileio.workdir_lock(sys.argv[1], 'grpo'):\n"
    "  os._exit(0)  # Dies holding the lock: no release, as after kill -9.\n"
  )
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
  assert '"job": "grpo"' in (tmp_path / fileio.LOCK_FILE).read_text()  # A stale record ...
  with fileio.workdir_lock(tmp_path, "sample"):  # ... and a free lock.
    assert '"job": "sample"' in (tmp_path / fileio.LOCK_FILE).read_text()


def test_checksums_name_the_changed_or_missing_file(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.bin").write_bytes(b"\x00" * 10)
  (tmp_path / "sub" / "b.json").write_text("{}")
  fileio.write_checksums(tmp_path)
  lines = (tmp_path / fileio.CHECKSUMS_FILE).read_text().splitlines()
  assert [line.split("  ")[1] for line in lines] == ["a.bin", "sub/b.json"]
  fileio.verify_checksums(tmp_path, "the test folder")
  (tmp_path / "extra.txt").write_text("added later")  # Not recorded: not checked.
  fileio.verify_checksums(tmp_path, "the test folder")
  (tmp_path / "a.bin").write_bytes(b"\x00" * 9 + b"\x01")
  with pytest.raises(ValueError, match="a.bin does not match its checksum.*the test folder"):
    fileio.verify_checksums(tmp_path, "the test folder")
  (tmp_path / "a.bin").write_bytes(b"\x00" * 10)
  (tmp_path / "sub" / "b.json").unlink()
  with pytest.raises(ValueError, match="b.json is missing.*the test folder is incomplete"):
    fileio.verify_checksums(tmp_path, "the test folder")
  fileio.verify_checksums(tmp_path / "sub", "a folder without a record")  # Passes.
