"""The pairs format: the project's interchange format for preference pairs.

A pairs folder holds `pairs.jsonl` and `images/`. Each non-blank line of `pairs.jsonl` is one JSON
object:

  id                str, unique in the file
  prompt            str, the ORIGINAL prompt; both images are judged against it
  chosen            str, path of the image made for `prompt`, relative to the folder (the winner)
  rejected          str, path of the image made for `perturbed_prompt`, relative to the folder
  perturbed_prompt  str, the prompt with one spatial relation changed
  relation_changed  str, free text such as "left of -> right of" or a relation type
  split             optional str ("train", "test", ...); rows without one belong to "train"
  source            optional dict or str: provenance (seeds, generator, ...)

Any data in this format works with every later job (TFDS builder, grain loader, reward training).
`read_pairs` validates a folder; `PairsWriter` is the crash-safe way for jobs to produce one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from spatial_jax import fileio

PAIRS_FILE = "pairs.jsonl"
IMAGES_DIR = "images"
DEFAULT_SPLIT = "train"

_REQUIRED_STR_KEYS = ("id", "prompt", "chosen", "rejected", "perturbed_prompt", "relation_changed")
_OPTIONAL_KEYS = ("split", "source")
_NON_EMPTY_KEYS = ("id", "chosen", "rejected")

ImageLike = np.ndarray | Image.Image


class PairsFormatError(ValueError):
  """A pairs folder or one of its lines is malformed; the message names the file/line/id."""


def _where(path: str | os.PathLike | None, line: int | None) -> str:
  """Location prefix like `folder/pairs.jsonl:12: ` for error messages."""
  parts = [os.fspath(path) if path is not None else None, str(line) if line is not None else None]
  loc = ":".join(p for p in parts if p)
  return f"{loc}: " if loc else ""


@dataclasses.dataclass(frozen=True)
class PairRecord:
  """One preference pair. `chosen` and `rejected` are image paths relative to the pairs folder."""

  id: str
  prompt: str
  chosen: str
  rejected: str
  perturbed_prompt: str
  relation_changed: str
  split: str | None = None
  source: dict[str, Any] | str | None = None

  @property
  def split_name(self) -> str:
    """The split this row belongs to (`DEFAULT_SPLIT` when the row names none)."""
    return self.split if self.split is not None else DEFAULT_SPLIT

  def to_json(self) -> dict[str, Any]:
    """The JSON object of one `pairs.jsonl` line (optional fields left out when None)."""
    obj = {k: getattr(self, k) for k in _REQUIRED_STR_KEYS}
    obj.update({k: getattr(self, k) for k in _OPTIONAL_KEYS if getattr(self, k) is not None})
    return obj

  @classmethod
  def from_json(
    cls, obj: Any, *, line: int | None = None, path: str | os.PathLike | None = None
  ) -> PairRecord:
    """Validates one parsed JSON line; errors name `path:line` and the key at fault."""
    where = _where(path, line)
    if not isinstance(obj, dict):
      raise PairsFormatError(f"{where}expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_REQUIRED_STR_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
      # Rejected rather than dropped: a misspelt "split" would otherwise silently land in train.
      raise PairsFormatError(
        f"{where}unknown key(s) {unknown}; allowed: {list(_REQUIRED_STR_KEYS + _OPTIONAL_KEYS)} "
        "(put extra provenance into 'source')"
      )
    for key in _REQUIRED_STR_KEYS:
      if key not in obj:
        raise PairsFormatError(f"{where}missing required key {key!r}")
      if not isinstance(obj[key], str):
        raise PairsFormatError(
          f"{where}key {key!r} must be a string, got {type(obj[key]).__name__}"
        )
    for key in _NON_EMPTY_KEYS:
      if not obj[key]:
        raise PairsFormatError(f"{where}key {key!r} must not be empty")
    for key in ("chosen", "rejected"):
      if os.path.isabs(obj[key]):
        raise PairsFormatError(
          f"{where}key {key!r} must be a path relative to the pairs folder, got {obj[key]!r}"
        )
    split = obj.get("split")
    if split is not None and (not isinstance(split, str) or not split):
      raise PairsFormatError(f"{where}key 'split' must be a non-empty string, got {split!r}")
    source = obj.get("source")
    if source is not None and not isinstance(source, dict | str):
      raise PairsFormatError(
        f"{where}key 'source' must be an object or a string, got {type(source).__name__}"
      )
    return cls(**{k: obj[k] for k in _REQUIRED_STR_KEYS}, split=split, source=source)


def pairs_file(folder: str | os.PathLike) -> str:
  """Path of `pairs.jsonl` in `folder`; a FileNotFoundError names whichever is missing."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"pairs folder not found: {folder}")
  path = os.path.join(folder, PAIRS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} not found: a pairs folder needs {PAIRS_FILE} and {IMAGES_DIR}/ (see "
      "spatial_jax/data/pairs.py)"
    )
  return path


def _parse_lines(path: str) -> Iterator[tuple[int, PairRecord]]:
  """Yields (line number, record) for every non-blank line, checking JSON, keys and unique ids."""
  first_line_of: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for lineno, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        hint = ""
        if not text.endswith("\n"):
          hint = " (the last line has no newline: an interrupted write? PairsWriter repairs it)"
        raise PairsFormatError(
          f"{_where(path, lineno)}malformed JSON: {e.msg} at column {e.colno}{hint}"
        ) from None
      record = PairRecord.from_json(obj, line=lineno, path=path)
      if record.id in first_line_of:
        raise PairsFormatError(
          f"{_where(path, lineno)}duplicate id {record.id!r} (first on line "
          f"{first_line_of[record.id]})"
        )
      first_line_of[record.id] = lineno
      yield lineno, record


def read_pairs(
  folder: str | os.PathLike, *, split: str | None = None, check_images: bool = True
) -> list[PairRecord]:
  """Reads and validates a pairs folder.

  Args:
    folder: folder holding `pairs.jsonl` and the images it names.
    split: keep only rows of this split (rows without a `split` count as "train"); None keeps all.
      The whole file is validated either way.
    check_images: check that both image files of every returned row exist.

  Returns:
    The records in file order.

  Raises:
    FileNotFoundError: the folder or its `pairs.jsonl` does not exist.
    PairsFormatError: a malformed line, missing/mistyped key, duplicate id or missing image; the
      message names the file and line (and the image path and pair id for images).
  """
  path = pairs_file(folder)
  rows = [(n, r) for n, r in _parse_lines(path) if split is None or r.split_name == split]
  if check_images:
    missing = [
      (n, r, getattr(r, key))
      for n, r in rows
      for key in ("chosen", "rejected")
      if not os.path.isfile(os.path.join(folder, getattr(r, key)))
    ]
    if missing:
      n, r, image = missing[0]
      more = f" (and {len(missing) - 1} more missing images)" if len(missing) > 1 else ""
      raise PairsFormatError(
        f"{_where(path, n)}pair {r.id!r}: image not found: {os.path.join(folder, image)}{more}"
      )
  return [r for _, r in rows]


def image_size_hw(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
  """Normalises an image size (int side or (height, width)) to (height, width)."""
  if image_size is None:
    return None
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  h, w = (int(s) for s in image_size)
  if h <= 0 or w <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  return h, w


def load_rgb(image: str | os.PathLike | bytes | ImageLike) -> np.ndarray:
  """Decodes a path, encoded bytes, PIL image or array to a uint8 (H, W, 3) RGB array."""
  if isinstance(image, np.ndarray):
    arr = np.ascontiguousarray(image)  # PIL needs C order (e.g. for slices / transposes).
    if arr.ndim == 2:
      arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
      raise ValueError(f"expected a uint8 (H, W, 3) image, got {arr.dtype} {arr.shape}")
    return arr
  if isinstance(image, bytes):
    image = io.BytesIO(image)
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"))
  try:
    with Image.open(image) as img:
      # convert() also handles palette, grayscale and RGBA user images.
      return np.asarray(img.convert("RGB"))
  except FileNotFoundError:
    raise  # Names its file already.
  except OSError as e:  # PIL's "image file is truncated" and the like name no file.
    if isinstance(image, io.BytesIO):
      raise
    raise OSError(f"{os.fspath(image)}: cannot decode the image ({e})") from e


def resize_rgb(image: np.ndarray, size_hw: tuple[int, int] | None) -> np.ndarray:
  """Resizes a uint8 RGB array to (height, width) with PIL bicubic; a no-op at that size."""
  if size_hw is None or image.shape[:2] == tuple(size_hw):
    return image
  h, w = size_hw
  return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))


def encode_png(image: ImageLike) -> bytes:
  """Encodes an image (see `load_rgb`) as RGB PNG bytes (lossless)."""
  buf = io.BytesIO()
  Image.fromarray(load_rgb(image)).save(buf, format="PNG")
  return buf.getvalue()


def _safe_stem(pair_id: str) -> str:
  """A file-name-safe stem for an id; a hash suffix keeps sanitised ids distinct."""
  stem = re.sub(r"[^A-Za-z0-9_-]", "_", pair_id)[:100]  # No dots: no hidden files, no "..".
  if stem != pair_id:
    stem = f"{stem}-{hashlib.sha1(pair_id.encode()).hexdigest()[:8]}"
  return stem


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:  # Not supported on some platforms/filesystems; the rename is still atomic.
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _repair_tail(path: str) -> None:
  """Makes `path` end with a complete line: a torn last line (interrupted write) is cut away.

  A last line that lacks only its newline but is a valid JSON object (e.g. hand-written files) is
  kept and gets the newline, so no complete row is ever lost.
  """
  with open(path, "rb+") as f:
    data = f.read()
    if not data or data.endswith(b"\n"):
      return
    start = data.rfind(b"\n") + 1
    tail = data[start:]
    try:
      complete = isinstance(json.loads(tail), dict)
    except ValueError:
      complete = False
    if complete:
      f.write(b"\n")
    else:
      logging.warning(
        "%s: dropping a torn last line (%d bytes) left by an interrupted write", path, len(tail)
      )
      f.truncate(start)
    f.flush()
    os.fsync(f.fileno())


class PairsWriter:
  """Appends pairs to a folder, safe to rerun into the same folder.

  On open it repairs a torn last line from an interrupted run and loads the existing ids, so a job
  can `if writer.has(pair_id): continue`. Each `add` writes both PNGs atomically BEFORE its line,
  then writes the line whole and fsyncs it: a crash never leaves a line pointing at a missing image
  and never loses a written line. One writer per folder at a time (enforced with a file lock where
  the platform has one).

  `sync_every=N` makes pairs durable N at a time, for pairs that are cheap to make again (the
  synthetic world's, 4 fsyncs a pair being most of their cost): the images are synced as one batch,
  then the batch's lines are written and fsynced. A crash still never leaves a line pointing at a
  missing image; it loses at most the last N - 1 pairs (their images remain, unlisted, and a
  rerun writes them again).

  Usage:
    with PairsWriter(folder) as writer:
      for ...:
        if not writer.has(pair_id):
          writer.add(id=pair_id, prompt=..., perturbed_prompt=..., relation_changed=...,
                     chosen_image=img_w, rejected_image=img_l, split="train", source={...})
  """

  def __init__(self, folder: str | os.PathLike, *, sync_every: int = 1):
    if sync_every < 1:
      raise ValueError(f"PairsWriter sync_every must be >= 1, got {sync_every}")
    self.folder = os.fspath(folder)
    self._sync_every = sync_every if hasattr(os, "sync") else 1
    self._pending: list[bytes] = []  # Lines whose images are written but not yet synced.
    self._images_dir = os.path.join(self.folder, IMAGES_DIR)
    os.makedirs(self._images_dir, exist_ok=True)
    self._path = os.path.join(self.folder, PAIRS_FILE)
    # Append mode: every write lands at the end, also after _repair_tail truncates.
    self._file = open(self._path, "ab")
    try:
      _lock(self._file, self._path)
      _repair_tail(self._path)
      _fsync_dir(self.folder)  # Persist a newly created pairs.jsonl's directory entry.
      # Leftovers of an interrupted atomic write; safe to delete while we hold the lock.
      for name in os.listdir(self._images_dir):
        if fileio.is_leftover(name):
          os.remove(os.path.join(self._images_dir, name))
      self._ids = {r.id for _, r in _parse_lines(self._path)}
    except BaseException:
      self._file.close()
      raise

  def __enter__(self) -> PairsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Makes the pending pairs durable, closes the file (and releases the folder lock)."""
    if self._file.closed:
      return
    try:
      self._commit()
    finally:
      self._file.close()

  def _commit(self) -> None:
    """Syncs the pending pairs' images, then writes and fsyncs their lines."""
    if not self._pending:
      return
    if self._sync_every > 1:
      os.sync()  # Every image written so far (one call instead of an fsync per file).
    _fsync_dir(self._images_dir)
    self._file.write(b"".join(self._pending))
    self._file.flush()
    os.fsync(self._file.fileno())
    self._pending.clear()

  def has(self, pair_id: str) -> bool:
    """Whether a row with this id is already in the folder."""
    return pair_id in self._ids

  def __len__(self) -> int:
    return len(self._ids)

  def add(
    self,
    *,
    id: str,  # The format's key name, so callers can pass **record fields.
    prompt: str,
    perturbed_prompt: str,
    relation_changed: str,
    chosen_image: ImageLike,
    rejected_image: ImageLike,
    split: str | None = None,
    source: dict[str, Any] | str | None = None,
  ) -> PairRecord:
    """Writes images/<id>_chosen.png, images/<id>_rejected.png, then appends the line.

    Images are uint8 (H, W, 3) arrays or PIL images. Returns the written record.
    """
    if self._file.closed:
      raise ValueError(f"PairsWriter for {self.folder} is closed")
    if id in self._ids:
      raise PairsFormatError(f"pair id {id!r} already in {self._path}; skip it with has(id)")
    stem = _safe_stem(id)
    record = PairRecord.from_json(
      dict(
        id=id,
        prompt=prompt,
        chosen=f"{IMAGES_DIR}/{stem}_chosen.png",
        rejected=f"{IMAGES_DIR}/{stem}_rejected.png",
        perturbed_prompt=perturbed_prompt,
        relation_changed=relation_changed,
        **({"split": split} if split is not None else {}),
        **({"source": source} if source is not None else {}),
      )
    )
    line = (json.dumps(record.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
    for name, image in (("chosen_image", chosen_image), ("rejected_image", rejected_image)):
      try:
        png = encode_png(image)
      except (ValueError, TypeError) as e:
        raise ValueError(f"pair {id!r}: bad {name}: {e}") from None
      rel = record.chosen if name == "chosen_image" else record.rejected
      fileio.write_atomic(os.path.join(self.folder, rel), png, sync=self._sync_every == 1)
    self._pending.append(line)
    self._ids.add(id)
    if len(self._pending) >= self._sync_every:
      self._commit()
    return record


def _lock(file, path: str) -> None:
  """Takes an exclusive, non-blocking lock so two writers never interleave lines."""
  try:
    import fcntl
  except ImportError:  # Windows: no advisory locks; the one-writer rule is then the caller's.
    return
  try:
    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise RuntimeError(f"{path} is open in another PairsWriter (one writer per folder)") from None
