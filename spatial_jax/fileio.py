"""Atomic file writes: a reader or a crash sees the old file or the new one, never half.

The data is written to a temporary file in the same directory (same filesystem), flushed
and fsynced, then moved over the target with `os.replace`. Temporary names are
`.<name>.<random>.tmp`, so `is_leftover` can recognise what an interrupted write left.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

_LEFTOVER = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
  """Yields a binary file; on success it replaces `path`, on error `path` is untouched."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; outputs should be readable by others.
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes `data` to `path` atomically (object stores such as gs:// write whole objects)."""
  path = os.fspath(path)
  if "://" in path:  # No rename on object stores, but each object write is atomic.
    from etils import epath

    epath.Path(path).write_bytes(data)
    return
  with atomic_writer(path) as f:
    f.write(data)


def is_leftover(name: str) -> bool:
  """Whether a file name is a temporary file an interrupted `atomic_writer` left behind."""
  return bool(_LEFTOVER.match(name))
