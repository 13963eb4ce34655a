"""Dynamic batching for the SpatialScore service: concurrent requests packed into fixed buckets.

Requests wait in a bounded queue (`submit` raises `QueueFull` when it is full: the server
answers 503). One worker thread takes the oldest request, adds whatever else is queued (waiting
at most `max_wait_s` for more; by default not at all: requests that arrive during a call are
packed into the next one) while the rows fit the largest bucket, and scores them in one call at
the smallest bucket that holds them. The scorer pads each call to its bucket, so a
service compiles one program per bucket, never one per request size. Requests larger than the
largest bucket are scored alone, in chunks of it.

No JAX here: the scorer is any `score(images, prompts, batch_size) -> (mu, sigma)`.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

ScoreFn = Callable[[list[Any], list[str], int], tuple[np.ndarray, np.ndarray]]


class QueueFull(RuntimeError):
  """The service holds `max_queue` requests already; retry later (HTTP 503)."""


@dataclasses.dataclass
class _Request:
  images: list[Any]
  prompts: list[str]
  future: Future
  queued_at: float


@dataclasses.dataclass
class Stats:
  """Counters since start: requests answered, scoring calls, rows, and recent latencies."""

  requests: int = 0
  calls: int = 0
  rows: int = 0
  errors: int = 0
  latencies_s: collections.deque = dataclasses.field(
    default_factory=lambda: collections.deque(maxlen=1000)
  )

  def as_dict(self) -> dict[str, Any]:
    lat = np.asarray(self.latencies_s) * 1e3
    pct = lambda q: round(float(np.percentile(lat, q)), 2) if lat.size else None  # noqa: E731
    return dict(
      requests=self.requests,
      calls=self.calls,
      rows=self.rows,
      errors=self.errors,
      rows_per_call=round(self.rows / self.calls, 2) if self.calls else None,
      latency_ms_p50=pct(50),
      latency_ms_p99=pct(99),
    )


class Batcher:
  """Packs concurrent requests into bucketed scoring calls on one worker thread."""

  def __init__(
    self,
    score: ScoreFn,
    buckets: Sequence[int],
    *,
    max_queue: int = 64,
    max_wait_s: float = 0.0,
  ):
    if not buckets or min(buckets) < 1:
      raise ValueError(f"buckets must be positive sizes, got {list(buckets)}")
    if max_queue < 1:
      raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    self.buckets = sorted(set(int(b) for b in buckets))
    self.max_queue = max_queue
    self.max_wait_s = max_wait_s
    self.stats = Stats()
    self._score = score
    self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=max_queue)
    self._held: _Request | None = None  # Taken from the queue but not fitting the last call.
    self._worker = threading.Thread(target=self._run, name="spatial-score-batcher", daemon=True)
    self._worker.start()

  def bucket_for(self, rows: int) -> int:
    """The smallest bucket holding `rows`, or the largest (the call then runs in chunks)."""
    i = bisect.bisect_left(self.buckets, rows)
    return self.buckets[min(i, len(self.buckets) - 1)]

  def submit(self, images: list[Any], prompts: list[str]) -> Future:
    """Queues one request; its future gives (mu, sigma) numpy arrays. Raises QueueFull."""
    request = _Request(list(images), list(prompts), Future(), time.perf_counter())
    try:
      self._queue.put_nowait(request)
    except queue.Full:
      raise QueueFull(
        f"The service is busy: {self._queue.maxsize} requests are queued; retry later"
      ) from None
    return request.future

  def close(self) -> None:
    """Stops the worker after the queued requests."""
    self._queue.put(None)
    self._worker.join()

  def _next_batch(self) -> list[_Request] | None:
    first = self._held or self._queue.get()
    self._held = None
    if first is None:
      return None
    batch, rows = [first], len(first.images)
    deadline = time.perf_counter() + self.max_wait_s
    while rows < self.buckets[-1]:
      try:
        timeout = max(0.0, deadline - time.perf_counter())
        request = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if request is None:
        self._queue.put(None)  # Seen again after this batch: stop then.
        break
      if rows + len(request.images) > self.buckets[-1]:
        self._held = request  # Starts the next call.
        break
      batch.append(request)
      rows += len(request.images)
    return batch

  def _run(self) -> None:
    while (batch := self._next_batch()) is not None:
      images = [im for r in batch for im in r.images]
      prompts = [p for r in batch for p in r.prompts]
      try:
        mu, sigma = self._score(images, prompts, self.bucket_for(len(images)))
      except Exception as e:  # noqa: BLE001 -- each waiting request gets the error.
        self.stats.errors += len(batch)
        for r in batch:
          r.future.set_exception(e)
        continue
      self.stats.calls += 1
      self.stats.rows += len(images)
      start = 0
      now = time.perf_counter()
      for r in batch:
        n = len(r.images)
        r.future.set_result(
          (np.asarray(mu[start : start + n]), np.asarray(sigma[start : start + n]))
        )
        start += n
        self.stats.requests += 1
        self.stats.latencies_s.append(now - r.queued_at)
