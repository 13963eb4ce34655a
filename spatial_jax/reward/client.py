"""A client of the SpatialScore service (`reward_serve`): numpy, PIL and the standard library
only, so a PyTorch trainer can call it without JAX.

  client = SpatialScoreClient("http://127.0.0.1:8123", token=os.environ.get("SPATIAL_SCORE_TOKEN"))
  mu, sigma = client.score(images, prompts)    # uint8 (H, W, 3) arrays or PIL images
  future = client.score_async(images, prompts)  # the same on a worker thread

Images travel as PNG (lossless: the server scores the same pixels as in-process scoring).
While the server is down or busy (connection refused, 502/503/504) the client retries with
exponential backoff for up to `retry_s` seconds, then raises `ServiceUnavailable`; a refused
request (4xx) raises `RequestRefused` with the server's message at once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from spatial_jax.reward import protocol

TOKEN_ENV = "SPATIAL_SCORE_TOKEN"
_RETRY_STATUS = (502, 503, 504)


class ServiceUnavailable(ConnectionError):
  """The service did not answer within the client's retry time."""


class RequestRefused(ValueError):
  """The service refused the request (4xx); `status` and the server's message."""

  def __init__(self, status: int, message: str):
    super().__init__(f"HTTP {status}: {message}")
    self.status = status


class SpatialScoreClient:
  """Scores (image, prompt) pairs on a SpatialScore service; safe to share between threads."""

  def __init__(
    self,
    url: str,
    *,
    token: str | None = None,
    timeout_s: float = 300.0,
    retry_s: float = 120.0,
    max_images_per_request: int = 64,
    image_format: str = "PNG",
  ):
    if not url.startswith(("http://", "https://")):
      raise ValueError(f"A SpatialScore service URL starts with http:// or https://, got {url!r}")
    self.url = url.rstrip("/")
    self.token = token or ""
    self.timeout_s, self.retry_s = timeout_s, retry_s
    self.max_images_per_request = max_images_per_request
    self.image_format = image_format
    self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spatial-score-client")
    self._async = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spatial-score-async")

  def health(self) -> dict[str, Any]:
    """GET /health (with retries)."""
    return json.loads(self._call(urllib.request.Request(self.url + "/health")))

  def score(
    self, images: Sequence[Any], prompts: Sequence[str] | str
  ) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float32 (N,) for each image against its prompt (or one prompt for all)."""
    images = list(images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    mus, sigmas = [], []
    step = self.max_images_per_request
    # Requests of at most max_images_per_request sent together: the server packs them.
    futures = [
      self._pool.submit(self._score_one, images[i : i + step], prompts[i : i + step])
      for i in range(0, len(images), step)
    ]
    for future in futures:
      mu, sigma = future.result()
      mus.append(mu)
      sigmas.append(sigma)
    return np.concatenate(mus), np.concatenate(sigmas)

  def score_async(self, images: Sequence[Any], prompts: Sequence[str] | str) -> Future:
    """`score` on a thread: a future of (mu, sigma)."""
    return self._async.submit(self.score, images, prompts)

  def _score_one(self, images: list[Any], prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    body = protocol.json_request(images, prompts, self.image_format)
    request = urllib.request.Request(
      self.url + "/score", data=body, headers={"Content-Type": protocol.JSON_TYPE}
    )
    answer = json.loads(self._call(request))
    return np.asarray(answer["mu"], np.float32), np.asarray(answer["sigma"], np.float32)

  def _call(self, request: urllib.request.Request) -> bytes:
    if self.token:
      request.add_header("Authorization", f"Bearer {self.token}")
    deadline = time.monotonic() + self.retry_s
    delay, last = 0.1, ""
    while True:
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          return response.read()
      except urllib.error.HTTPError as e:
        message = _message(e)
        if e.code not in _RETRY_STATUS:
          raise RequestRefused(e.code, message) from None
        last = f"HTTP {e.code}: {message}"
      except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
      if time.monotonic() + delay > deadline:
        raise ServiceUnavailable(
          f"SpatialScore service {self.url} did not answer within {self.retry_s} s (last: {last})"
        )
      time.sleep(delay)
      delay = min(delay * 2, 5.0)


def _message(error: urllib.error.HTTPError) -> str:
  try:
    return json.loads(error.read()).get("error", "")
  except (ValueError, OSError, AttributeError):
    return str(error.reason)
