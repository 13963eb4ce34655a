"""Metric writers (TensorBoard + logs), progress/ETA logging, image grids and JSON run files.

`create_writer` logs every metric and, with the `tensorboard` extra installed, also writes
TensorBoard event files through tensorboardX (no TensorFlow). Models, samplers and benchmarks must
import without either, so tensorboardX is imported only inside `create_writer`; everything else
(Progress, grids, PNGs, JSON) needs only numpy, Pillow and absl. A writer is any object with
`write_scalars` and `write_images` (clu's `MetricWriter` methods), plus `flush` and `close`.

Per-run files (`summary.json`, `config.json`, PNGs) are written by process 0 only, atomically (a
tmp file then `os.replace`), so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import jax
import numpy as np
from absl import logging

from spatial_jax import fileio

T = TypeVar("T")


class MetricWriter(Protocol):
  """What the jobs call on a writer (clu's `MetricWriter` method names, duck-typed)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...

  def write_images(self, step: int, images: Mapping[str, Any]) -> None: ...


class LoggingWriter:
  """Logs scalars as `[step] name=value, ...` (clu's LoggingWriter format) and image shapes."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = []
    for k, v in sorted(scalars.items()):
      v = np.asarray(v).item() if isinstance(v, (np.ndarray, np.generic, jax.Array)) else v
      values.append(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}")
    logging.info("[%d] %s", step, ", ".join(values))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})

  def flush(self) -> None:
    logging.flush()

  def close(self) -> None:
    self.flush()


class TensorBoardWriter(LoggingWriter):
  """Logs like `LoggingWriter` and writes the same values to TensorBoard event files in `logdir`.

  tensorboardX writes the files from a background thread; `flush()` pushes what is queued to disk.
  Images are (H, W, C) or (N, H, W, C), uint8 or float in [0, 1]; N images go in one grid.
  """

  def __init__(self, logdir: str | os.PathLike[str]):
    import tensorboardX  # Lazy: the `tensorboard` extra.

    self._writer = tensorboardX.SummaryWriter(logdir=os.fspath(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    super().write_scalars(step, scalars)
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(np.asarray(v)), global_step=step)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    super().write_images(step, images)
    for k, v in images.items():
      v = np.asarray(v)
      self._writer.add_images(k, v if v.ndim == 4 else v[None], step, dataformats="NHWC")

  def flush(self) -> None:
    super().flush()
    self._writer.flush()

  def close(self) -> None:
    super().close()
    self._writer.close()


_warned_no_tensorboard = False


def create_writer(workdir: str | os.PathLike[str]) -> LoggingWriter:
  """The jobs' writer: logs; TensorBoard event files in `workdir` on process 0.

  Other processes only log (and `main.py` keeps their logs to warnings and errors), so a
  multi-host run writes one event stream and one log. Without tensorboardX
  (`pip install -e '.[tensorboard]'`) every process only logs, with a warning the first time.
  Call `writer.flush()` at log steps and `writer.close()` at the end.
  """
  global _warned_no_tensorboard
  if jax.process_index() > 0:
    return LoggingWriter()
  try:
    return TensorBoardWriter(workdir)
  except ImportError as e:
    if not _warned_no_tensorboard:
      _warned_no_tensorboard = True
      logging.warning(
        "No TensorBoard event files: metrics are only logged (%s). "
        "pip install -e '.[tensorboard]' to write them.",
        e,
      )
    return LoggingWriter()


# -- progress -------------------------------------------------------------------------------------


def format_secs(secs: float) -> str:
  """12.3 -> '12.3s', 125 -> '2m05s', 7384 -> '2h03m04s'."""
  if not math.isfinite(secs):
    return "?"
  if secs < 60:
    return f"{secs:.1f}s"
  mins, s = divmod(int(round(secs)), 60)
  hours, mins = divmod(mins, 60)
  return f"{hours}h{mins:02d}m{s:02d}s" if hours else f"{mins}m{s:02d}s"


class Progress:
  """Logs `name: step/total (pct), rate, elapsed, ETA` every N steps and/or every T seconds.

  Works for training loops and plain loops (a data build) alike; it never imports tensorboardX.
  Call `update(step)` after each step with the number of steps done so far (absolute, so a resumed
  run passes `start_step=restored_step` and keeps counting). The rate is measured over the last
  reporting interval (so compile time or a slow start fades out); the ETA is the remaining steps at
  that rate. The last step (`step == total`) is always reported.

  Args:
    total: total number of steps, or None if unknown (then no percentage or ETA).
    every_steps: report when `step % every_steps == 0`.
    every_secs: report when this many seconds passed since the last report. If neither is given,
      every 60 s.
    writer: optional metric writer; gets `{name}/{unit}_per_sec` scalars at each report.
    name: prefix of the log line and the scalar.
    unit: what a step is called in the log ("steps", "images", "pairs", ...).
    start_step: the step count at construction (e.g. the restored checkpoint step).
    clock: seconds as a float; `time.monotonic` (tests pass a fake clock).
  """

  def __init__(
    self,
    total: int | None,
    *,
    every_steps: int | None = None,
    every_secs: float | None = None,
    writer: MetricWriter | None = None,
    name: str = "progress",
    unit: str = "steps",
    start_step: int = 0,
    clock: Callable[[], float] = time.monotonic,
  ):
    if every_steps is None and every_secs is None:
      every_secs = 60.0
    self.total = total
    self.every_steps = every_steps
    self.every_secs = every_secs
    self.writer = writer
    self.name = name
    self.unit = unit
    self._clock = clock
    self._t0 = clock()
    self._last_step = start_step
    self._last_time = self._t0

  def update(self, step: int) -> str | None:
    """Records that `step` steps are done; logs and returns the message when a report is due."""
    now = self._clock()
    due = (
      step == self.total
      or (self.every_steps is not None and step % self.every_steps == 0)
      or (self.every_secs is not None and now - self._last_time >= self.every_secs)
    )
    if not due or step == self._last_step:
      return None
    return self.report(step, now=now)

  __call__ = update

  def report(self, step: int, *, now: float | None = None) -> str:
    """Logs the progress line for `step` now, due or not, and returns it."""
    now = self._clock() if now is None else now
    dt = now - self._last_time
    rate = (step - self._last_step) / dt if dt > 0 else math.inf
    msg = f"{self.name}: {step}"
    if self.total:
      eta = (self.total - step) / rate if rate > 0 else math.inf
      msg += f"/{self.total} ({100 * step / self.total:.1f}%)"
    msg += f", {rate:.3g} {self.unit}/s, elapsed {format_secs(now - self._t0)}"
    if self.total:
      msg += f", ETA {format_secs(eta)}"
    logging.info(msg)
    if self.writer is not None and math.isfinite(rate):
      self.writer.write_scalars(step, {f"{self.name}/{self.unit}_per_sec": rate})
    self._last_step, self._last_time = step, now
    return msg

  def wrap(self, iterable: Iterable[T]) -> Iterator[T]:
    """Yields the items, calling `update` after each one is processed."""
    step = self._last_step
    for item in iterable:
      yield item
      step += 1
      self.update(step)


# -- images ---------------------------------------------------------------------------------------


def _to_uint8(images: Any) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
  return np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def make_grid(
  images: Any, ncols: int | None = None, pad: int = 2, pad_value: int = 0
) -> np.ndarray:
  """Tiles (N, H, W, C) images (uint8, or float in [0, 1]) into one (H', W', C) uint8 image.

  Row-major: image i is at row i // ncols, column i % ncols, with its top-left pixel at
  (pad + row * (H + pad), pad + col * (W + pad)); `pad` pixels of `pad_value` surround every tile,
  so H' = rows * (H + pad) + pad. Unused cells of the last row stay `pad_value`. `ncols` defaults to
  ceil(sqrt(N)).
  """
  images = _to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f"make_grid wants (N, H, W, C) images, got shape {images.shape}")
  n, h, w, c = images.shape
  ncols = min(ncols or math.ceil(math.sqrt(n)), n) if n else 1
  nrows = max(math.ceil(n / ncols), 1)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, image in enumerate(images):
    top, left = pad + (i // ncols) * (h + pad), pad + (i % ncols) * (w + pad)
    grid[top : top + h, left : left + w] = image
  return grid


def write_images(
  writer: MetricWriter | None,
  step: int,
  name: str,
  images: Any,
  *,
  png_path: str | os.PathLike[str] | None = None,
  ncols: int | None = None,
  pad: int = 2,
) -> np.ndarray:
  """Writes `images` as one grid to the writer (TensorBoard) and, if given, a PNG file.

  Returns the grid. The PNG is written by process 0 only (parent directories are created).
  """
  grid = make_grid(images, ncols=ncols, pad=pad)
  if writer is not None:
    writer.write_images(step, {name: grid[None]})
  if png_path is not None and jax.process_index() == 0:
    from PIL import Image  # Lazy: only image writers need Pillow.

    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    fileio.write_atomic(png_path, buf.getvalue())
  return grid


# -- JSON run files -------------------------------------------------------------------------------


def _json_default(x: Any) -> Any:
  """Converts numpy/jax scalars and arrays (and paths, dataclasses) for json.dumps."""
  if isinstance(x, (np.ndarray, np.generic, jax.Array)):
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":  # e.g. bfloat16 (kind 'V'): widen for JSON.
      x = x.astype(np.float64)
    return x.tolist()
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return dataclasses.asdict(x)
  raise TypeError(f"Object of type {type(x).__name__} is not JSON serializable: {x!r}")


def _finite(obj: Any) -> Any:
  """`obj` with every NaN / infinite float as None: JSON has no token for them (Python's `NaN`
  is not JSON, and strict readers refuse the file)."""
  if isinstance(obj, float | np.floating):
    return float(obj) if np.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [_finite(v) for v in obj]
  if isinstance(obj, np.ndarray | jax.Array) and np.asarray(obj).dtype.kind == "f":
    return _finite(np.asarray(obj, np.float64).tolist())
  return obj


def to_json(obj: Any) -> str:
  """Indented, key-sorted, strict JSON; numpy/jax values become plain numbers/lists, and a
  non-finite number becomes null."""
  return (
    json.dumps(_finite(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    + "\n"
  )


def write_summary(
  workdir: str | os.PathLike[str], summary: Mapping[str, Any], name: str = "summary.json"
) -> str:
  """Writes the run's summary dict to `workdir/name` (atomic, process 0); returns the path."""
  path = os.path.join(os.fspath(workdir), name)
  text = to_json(dict(summary))  # Serialize first: a bad value must not clobber the old file.
  if jax.process_index() == 0:
    fileio.write_atomic(path, text.encode())
  return path


def write_config_json(
  workdir: str | os.PathLike[str], config: Any, name: str = "config.json"
) -> str:
  """Writes an ml_collections ConfigDict (or a plain dict) to `workdir/name`; returns the path.

  A config with a `job` key is a workdir's record: it replaces only the record of the same job
  (a rerun or resume). Any other file of that name, such as another job's record or a model
  folder's own config, raises a ValueError before anything is written, because a model folder
  passed as `--workdir` of another job would otherwise lose the record it loads from.
  """
  if hasattr(config, "to_json_best_effort"):  # ConfigDict / FrozenConfigDict.
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
  else:
    text = to_json(dict(config))
  path = os.path.join(os.fspath(workdir), name)
  job = config.get("job") if hasattr(config, "get") else None
  if job is not None:
    check_workdir_owner(path, job)
  if jax.process_index() == 0:
    fileio.write_atomic(path, text.encode())
  return path


_OTHER_WORKDIR = (
  "Choose another --workdir: jobs read another run's or a model's folder through their config "
  "(e.g. --config.model_path, --config.model.generator)."
)


def check_workdir_owner(path: str, job: str) -> None:
  """Raises a ValueError unless `path` is absent or the record of a `job` run."""
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      existing = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(
      f"{path} exists but is not a readable job record ({e}); refusing to replace it. Choose "
      "another --workdir, or remove the file if it is a broken record of this run."
    ) from e
  if not isinstance(existing, dict) or "job" not in existing:
    raise ValueError(
      f"{path} is not a job record (no 'job' key; a model's own config?); a {job!r} run would "
      f"replace it. {_OTHER_WORKDIR}"
    )
  if existing["job"] != job:
    raise ValueError(
      f"{os.path.dirname(path) or '.'} holds a {existing['job']!r} run ({path}); this is a "
      f"{job!r} run and would replace that record. {_OTHER_WORKDIR}"
    )


class History:
  """Metric values by step, kept in `history.json` so a resumed run extends its curve (every
  trainer keeps one)."""

  FILE = "history.json"

  def __init__(self, rows: dict[str, list[tuple[int, float]]] | None = None):
    self.rows = collections.defaultdict(list, rows or {})

  @classmethod
  def load(cls, workdir: str) -> History:
    path = os.path.join(workdir, cls.FILE)
    if not os.path.exists(path):
      return cls()
    with open(path) as f:
      return cls({k: [tuple(x) for x in v] for k, v in json.load(f).items()})

  def add(self, step: int, values: Mapping[str, float]) -> None:
    for name, value in values.items():
      series = self.rows[name]
      while series and series[-1][0] >= step:  # A resumed run overwrites what it redoes.
        series.pop()
      series.append((int(step), float(value)))

  def save(self, workdir: str) -> None:
    write_summary(workdir, dict(self.rows), name=self.FILE)

  def plot(
    self,
    path: str,
    panels: Sequence[tuple[str, Sequence[str]]],
    ylim: Mapping[str, tuple[float, float]] | None = None,
  ) -> None:
    """One panel per (title, series names) against the step, as a PNG; `eval/` series (sparse)
    with markers. `ylim` fixes a panel's range by its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for axis, (title, names) in zip(axes[0], panels, strict=True):
      for name in names:
        if self.rows.get(name):
          steps, values = zip(*self.rows[name], strict=True)
          axis.plot(steps, values, label=name, marker="o" if name.startswith("eval") else None)
      axis.set_xlabel("step")
      axis.set_title(title)
      if ylim and title in ylim:
        axis.set_ylim(*ylim[title])
      axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
