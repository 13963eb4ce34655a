"""Atomic file writes: a reader or a crash sees the old file or the new one, never half.

The data is written to a temporary file in the same directory (same filesystem), flushed
and fsynced, then moved over the target with `os.replace`. Temporary names are
`.<name>.<random>.tmp`, so `is_leftover` can recognise what an interrupted write left.
`atomic_directory` does the same for a whole folder (a model export). `write_checksums` /
`verify_checksums` record an export's file hashes and check them at load, so that a damaged model
folder is named instead of loading wrong weights. `workdir_lock` keeps a workdir to one run at a
time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import BinaryIO

_LEFTOVER = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, sync: bool = True) -> Iterator[BinaryIO]:
  """Yields a binary file; on success it replaces `path`, on error `path` is untouched.

  `sync=False` skips the fsync before the rename: the file is whole or absent for any reader, but
  may be lost in a power cut until something syncs it (a caller that batches durability)."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; outputs should be readable by others.
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      if sync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_atomic(path: str | os.PathLike[str], data: bytes, *, sync: bool = True) -> None:
  """Writes `data` to `path` atomically (object stores such as gs:// write whole objects);
  `sync` as in `atomic_writer`."""
  path = os.fspath(path)
  if "://" in path:  # No rename on object stores, but each object write is atomic.
    from etils import epath

    epath.Path(path).write_bytes(data)
    return
  with atomic_writer(path, sync=sync) as f:
    f.write(data)


def is_leftover(name: str) -> bool:
  """Whether a file name is a temporary file an interrupted `atomic_writer` left behind."""
  return bool(_LEFTOVER.match(name))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[str]:
  """Yields a temporary folder to fill; on success it becomes `path` (replacing an old one).

  A crash while the folder is written leaves a `.<name>.<random>.tmp` folder beside `path`
  (recognised by `is_leftover`) and any old `path` untouched, so a reader never finds half a
  folder at `path`. The old folder is moved aside before the new one is renamed in, so a crash
  between the two renames leaves no `path` at all, never a mix. Object stores (gs://) have no
  rename: there the files are written into `path` directly.
  """
  path = os.fspath(path)
  if "://" in path:
    yield path
    return
  parent, name = os.path.split(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; outputs should be readable by others.
    yield tmp
    old = None
    if os.path.exists(path):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
      os.replace(path, os.path.join(old, name))
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


CHECKSUMS_FILE = "checksums.sha256"


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_checksums(folder: str | os.PathLike[str]) -> str:
  """Writes `<folder>/checksums.sha256`: the SHA-256 of every file under `folder`, in the format
  of `sha256sum` (so `cd folder && sha256sum -c checksums.sha256` checks it too). Call once the
  folder is complete. Returns the file's path."""
  folder = os.fspath(folder)
  lines = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, folder)
      if relative != CHECKSUMS_FILE and not is_leftover(name):
        lines.append(f"{_sha256(path)}  {relative}\n")
  path = os.path.join(folder, CHECKSUMS_FILE)
  write_atomic(path, "".join(lines).encode())
  return path


def verify_checksums(folder: str | os.PathLike[str], what: str) -> None:
  """Checks the files `write_checksums` recorded; a folder without the record (written before
  checksums existed) passes. Files added later are not checked.

  Raises:
    ValueError: naming the first file that is missing or whose contents changed, and `what`
      (e.g. "the generator folder") as damaged.
  """
  folder = os.fspath(folder)
  record = os.path.join(folder, CHECKSUMS_FILE)
  if not os.path.exists(record):
    return
  with open(record) as f:
    for number, line in enumerate(f, start=1):
      expected, sep, relative = line.rstrip("\n").partition("  ")
      if not sep:
        raise ValueError(f"{record}:{number} is not a checksum line: {what} is damaged.")
      path = os.path.join(folder, relative)
      if not os.path.isfile(path):
        raise ValueError(f"{path} is missing ({record} lists it): {what} is incomplete.")
      if _sha256(path) != expected:
        raise ValueError(
          f"{path} does not match its checksum in {record}: {what} is damaged or was changed "
          "after export. Export it again (or restore the file)."
        )


LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike[str], job: str) -> Iterator[None]:
  """Holds `<workdir>/.lock` (an exclusive `flock`) for the block: one run per workdir.

  The lock file names its holder (job, host, pid, start time). A holder that died released its
  lock with its process, so its workdir is taken over without a question. Where there are no
  advisory locks (Windows) the block runs unlocked.

  Raises:
    WorkdirBusyError: another live run holds the workdir; the message names it.
  """
  try:
    import fcntl
  except ImportError:
    yield
    return
  path = os.path.join(os.fspath(workdir), LOCK_FILE)
  os.makedirs(os.fspath(workdir), exist_ok=True)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "a run that has not named itself yet"
      raise WorkdirBusyError(
        f"{os.fspath(workdir)} is in use by another run ({holder}). Wait for it to end, stop it, "
        "or choose another --workdir."
      ) from None
    f.seek(0)
    f.truncate()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    f.write(json.dumps(dict(job=job, host=socket.gethostname(), pid=os.getpid(), since=since)))
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)
