"""The SpatialScore service's HTTP layer (stdlib `http.server`, one thread per connection).

  GET  /health  -> {"status": "ok", "model", "step", "dtype", "devices", "max_batch", "buckets",
                    "allow_pickle", "stats": {requests, calls, rows, latency_ms_p50/p99, ...}}
  POST /score   JSON (`protocol.decode_json`) -> {"mu": [...], "sigma": [...]}
                a pickled dict (`protocol.decode_pickle`), only with `allow_pickle`
  POST /        the same as /score (Flow-GRPO's clients post to the server's root)

A bearer token, when set, is required on every request (`Authorization: Bearer <token>`; 401
otherwise). Each refusal is a 4xx with a JSON `{"error": message}` naming the problem; a
scoring failure is a 500; a full queue a 503 (the client retries). Nothing a request sends can
stop the server: every handler error becomes an answer.
"""

from __future__ import annotations

import hmac
import http.server
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import logging

from spatial_jax.reward import batching, protocol


class Service:
  """What the handler needs: the batcher, limits, token, pickle switch and health fields."""

  def __init__(
    self,
    batcher: batching.Batcher,
    *,
    limits: protocol.Limits,
    token: str = "",
    allow_pickle: bool = False,
    info: dict[str, Any] | None = None,
    timeout_s: float = 300.0,
  ):
    self.batcher, self.limits, self.token = batcher, limits, token
    self.allow_pickle, self.info, self.timeout_s = allow_pickle, dict(info or {}), timeout_s

  def health(self) -> dict[str, Any]:
    return dict(
      status="ok",
      **self.info,
      max_batch=self.batcher.buckets[-1],
      buckets=self.batcher.buckets,
      allow_pickle=self.allow_pickle,
      max_queue=self.batcher.max_queue,
      stats=self.batcher.stats.as_dict(),
    )


def _handler(service: Service) -> type[http.server.BaseHTTPRequestHandler]:
  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # Keep-alive: a client's session reuses its connection.
    timeout = 120  # Seconds a stalled client may hold its connection's thread.

    def log_message(self, fmt: str, *args: Any) -> None:  # Through absl, not stderr.
      logging.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str = protocol.JSON_TYPE) -> None:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      if status == 503:
        self.send_header("Retry-After", "1")
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
      logging.warning("%s %s -> %d: %s", self.command, self.path, status, message)
      # The connection closes after a refusal: a body left unread would be parsed as the next
      # request.
      self.close_connection = True
      self._send(status, json.dumps({"error": message}).encode())

    def _authorised(self) -> bool:
      if not service.token:
        return True
      given = self.headers.get("Authorization", "")
      if hmac.compare_digest(given.encode(), f"Bearer {service.token}".encode()):
        return True
      self._error(401, "Missing or wrong bearer token (Authorization: Bearer <token>)")
      return False

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming.
      try:
        if not self._authorised():
          return
        if self.path.split("?")[0] != "/health":
          self._error(404, f"No such endpoint: GET {self.path}; use GET /health or POST /score")
          return
        self._send(200, json.dumps(service.health()).encode())
      except Exception as e:  # noqa: BLE001
        logging.exception("GET %s failed", self.path)
        self._try_error(500, f"{type(e).__name__}: {e}")

    def do_POST(self) -> None:  # noqa: N802
      try:
        self._post()
      except Exception as e:  # noqa: BLE001 -- never let a request end the server.
        logging.exception("POST %s failed", self.path)
        self._try_error(500, f"{type(e).__name__}: {e}")

    def _try_error(self, status: int, message: str) -> None:
      try:
        self._error(status, message)
      except OSError:  # The client is gone.
        pass

    def _read_body(self) -> bytes | None:
      length = self.headers.get("Content-Length")
      if length is None or not length.isdigit():
        self._error(411, "A POST needs a Content-Length header")
        return None
      length = int(length)
      if length > service.limits.max_request_bytes:
        self._error(
          413, f"The body is {length} bytes > the limit of {service.limits.max_request_bytes}"
        )
        return None
      body = self.rfile.read(length)
      if len(body) != length:
        self._error(400, f"The body ended after {len(body)} of {length} bytes (truncated)")
        return None
      return body

    def _post(self) -> None:
      started = time.perf_counter()
      if self.path.split("?")[0] not in ("/score", "/"):
        self._error(404, f"No such endpoint: POST {self.path}; use POST /score")
        return
      if not self._authorised():
        return
      body = self._read_body()
      if body is None:
        return
      content_type = self.headers.get("Content-Type", protocol.JSON_TYPE).split(";")[0].strip()
      pickled = content_type != protocol.JSON_TYPE
      if pickled and not service.allow_pickle:
        self._error(
          415,
          f"Content-Type {content_type!r}: this server takes JSON ({protocol.JSON_TYPE}); "
          "pickled requests need --config.allow_pickle=True (unsafe beyond loopback)",
        )
        return
      try:
        decode = protocol.decode_pickle if pickled else protocol.decode_json
        images, prompts = decode(body, service.limits)
        future = service.batcher.submit(images, prompts)
      except protocol.RequestError as e:
        self._error(e.status, e.message)
        return
      except batching.QueueFull as e:
        self._error(503, str(e))
        return
      try:
        mu, sigma = future.result(timeout=service.timeout_s)
      except TimeoutError:
        self._error(503, f"Scoring took more than {service.timeout_s} s; retry later")
        return
      except Exception as e:  # noqa: BLE001 -- the model failed on this batch.
        self._error(500, f"Scoring failed: {type(e).__name__}: {e}")
        return
      answer = protocol.pickle_answer if pickled else protocol.json_answer
      self._send(200, answer(mu, sigma), protocol.PICKLE_TYPE if pickled else protocol.JSON_TYPE)
      logging.info(
        "scored %d images in %.1f ms (%s)",
        len(images),
        (time.perf_counter() - started) * 1e3,
        "pickle" if pickled else "json",
      )

  return Handler


class Server(http.server.ThreadingHTTPServer):
  """`ThreadingHTTPServer` bound to (host, port) (port 0: any free one, see `.port`)."""

  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0):
    super().__init__((host, port), _handler(service))
    self.service = service

  @property
  def port(self) -> int:
    return self.server_address[1]

  @property
  def url(self) -> str:
    host = self.server_address[0]
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"

  def start(self) -> threading.Thread:
    """Serves on a background thread (tests, notebooks); `shutdown()` stops it."""
    thread = threading.Thread(target=self.serve_forever, name="spatial-score-http", daemon=True)
    thread.start()
    return thread


def serve(service: Service, host: str, port: int, on_ready: Callable[[Server], None]) -> None:
  """Serves until interrupted (KeyboardInterrupt / SIGTERM raised as SystemExit)."""
  with Server(service, host, port) as server:
    on_ready(server)
    try:
      server.serve_forever()
    finally:
      service.batcher.close()
