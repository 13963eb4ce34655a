"""Shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this is importable).

The protocol every ours-vs-reference figure follows:
- one process, the same inputs, each side warmed up first (ours compiles);
- the two sides alternate, call by call, and the order flips every repeat, so a machine that
  slows down or speeds up during the run weighs on both alike;
- the figure is the median of the per-repeat ratios ours / reference, with their 25th-75th
  percentile range as the spread (>= 10 repeats for a published figure);
- the run records the threads each side may use, the library versions and the machine's load,
  and warns when another process was busy (a number measured beside other work is not a
  benchmark).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np


def median_time(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of `fn` over `repeats` calls, after one warm-up call (compiles ours)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _timed(fn: Callable[..., object], setup: Callable[[], object] | None = None) -> float:
  args = () if setup is None else (setup(),)
  start = time.perf_counter()
  fn(*args)
  return time.perf_counter() - start


def _summary(values: list[float]) -> dict:
  q25, q50, q75 = np.percentile(values, [25, 50, 75])
  return dict(median=float(f"{q50:.4g}"), p25=float(f"{q25:.4g}"), p75=float(f"{q75:.4g}"))


def compare(
  ours: Callable[..., object],
  reference: Callable[..., object],
  repeats: int,
  *,
  setup_ours: Callable[[], object] | None = None,
  setup_reference: Callable[[], object] | None = None,
) -> dict:
  """Times `ours` and `reference` alternately (order flipped every repeat) after a warm-up call
  of each; returns the medians and quartiles of each side's seconds and of the per-repeat
  ratio ours / reference. A `setup_*` runs untimed before each call and its result is the
  call's argument (e.g. the forward pass whose backward is timed)."""
  _timed(ours, setup_ours), _timed(reference, setup_reference)
  t_ours, t_ref = [], []
  for i in range(repeats):
    if i % 2:
      t_ref.append(_timed(reference, setup_reference))
      t_ours.append(_timed(ours, setup_ours))
    else:
      t_ours.append(_timed(ours, setup_ours))
      t_ref.append(_timed(reference, setup_reference))
  ratios = [a / b for a, b in zip(t_ours, t_ref, strict=True)]
  return dict(ours_s=_summary(t_ours), reference_s=_summary(t_ref), ratio=_summary(ratios))


_BUSY: dict[str, float] = {}  # What warn_if_busy measured, for `environment`.


def _cpu_times() -> tuple[int, int] | None:
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return sum(fields), idle


def machine_load(seconds: float = 1.0) -> float:
  """The fraction of the machine's CPU time that was busy over the next `seconds` (the calling
  script sleeps meanwhile, so this is other processes' use: ~0 on an idle machine, ~1 when every
  core is busy). Without /proc/stat: the 1-minute load average per core, which lags."""
  before = _cpu_times()
  if before is None:
    return os.getloadavg()[0] / (os.cpu_count() or 1)
  time.sleep(seconds)
  after = _cpu_times()
  total, idle = after[0] - before[0], after[1] - before[1]
  return 1.0 - idle / total if total else 0.0


def environment(torch_module=None) -> dict:
  """What a figure depends on besides the code: cores, threads, versions, load."""
  import jax  # noqa: PLC0415  (the scripts set up jax's environment before importing it)

  env = dict(
    machine=f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
    jax=jax.__version__,
    jax_backend=jax.default_backend(),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    busy_before=_BUSY.get("before"),
  )
  if torch_module is not None:
    env.update(torch=torch_module.__version__, torch_threads=torch_module.get_num_threads())
  return env


def warn_if_busy(threshold: float = 0.15) -> float:
  """Warns on stderr when other processes keep the cores busy; returns the busy fraction."""
  load = machine_load()
  _BUSY["before"] = round(load, 3)
  if load > threshold:
    print(
      f"WARNING: the cores were {load:.0%} busy before the run: another process is using them, "
      "the figures are not an idle machine's",
      file=sys.stderr,
    )
  return load
