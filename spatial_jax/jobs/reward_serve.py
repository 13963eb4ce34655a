"""Job `reward_serve`: SpatialScore as an HTTP service that RL trainers call (README "Reward
service").

  python -m spatial_jax.main --config configs/reward_serve.py --workdir workdirs/serve \
    --config.model_path=workdirs/reward

Loads a `reward_train` workdir or an export (`SpatialScore.load`), compiles one scorer per
batch bucket, then serves `reward/server.py`'s endpoints on `config.host:config.port`
(127.0.0.1 by default) until SIGTERM or Ctrl-C. Once it listens, `<workdir>/server.json` holds
its URL (with `port=0` the port is any free one), model and buckets. Concurrent requests are
packed into the buckets (`reward/batching.py`); the log has each request's latency.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from spatial_jax import configs_lib, fileio, metrics
from spatial_jax.reward import batching, protocol, server
from spatial_jax.reward.client import TOKEN_ENV
from spatial_jax.reward.inference import SpatialScore

SERVER_FILE = "server.json"


def load_scorer(config: Any) -> SpatialScore:
  """The model `config.model_path` names; under `:smoke` without one, an untrained tiny one."""
  if config.model_path:
    return SpatialScore.load(config.model_path, batch_size=max(config.buckets))
  if not config.get("untrained_smoke_model", False):
    raise ValueError(
      "config.model_path must name a reward_train workdir or a SpatialScore export "
      "(configs/reward_serve.py:smoke serves an untrained tiny model instead)"
    )
  logging.warning("No config.model_path: serving an untrained tiny SpatialScore (smoke).")
  tiny = configs_lib.load_config("configs/reward_synthetic.py", "smoke")
  tiny.seed = config.seed
  return SpatialScore.from_config(tiny, batch_size=max(config.buckets))


def make_service(scorer: SpatialScore, config: Any) -> server.Service:
  """The batcher over `scorer` (each bucket compiled now, not on the first request) and the
  service's limits, token and health fields."""

  def score(images: list[Any], prompts: list[str], bucket: int):
    return scorer.score(images, prompts, batch_size=bucket)

  for bucket in sorted(config.buckets):  # Warm-up: one compile per bucket.
    started = time.perf_counter()
    image = np.zeros((scorer.image_size or 32, scorer.image_size or 32, 3), np.uint8)
    score([image], ["warm-up"], bucket)
    logging.info("bucket %d compiled in %.1f s", bucket, time.perf_counter() - started)
  batcher = batching.Batcher(
    score, config.buckets, max_queue=config.max_queue, max_wait_s=config.max_wait_ms / 1e3
  )
  token = config.token or os.environ.get(TOKEN_ENV, "")
  info = dict(
    model=scorer.source or "(untrained)",
    step=scorer.step,
    dtype=str(scorer.config.model.dtype),
    devices=[str(d) for d in jax.devices()],
    image_size=scorer.image_size,
    auth=bool(token),
  )
  return server.Service(
    batcher,
    limits=protocol.Limits(**config.limits),
    token=token,
    allow_pickle=config.allow_pickle,
    info=info,
    timeout_s=config.request_timeout_s,
  )


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Serves until SIGTERM / Ctrl-C (or `serve_seconds`); returns the service's counters."""
  configs_lib.check_sizes(config, {"max_queue": 1, "serve_seconds": 0})
  if not config.request_timeout_s > 0:
    raise ValueError(f"config.request_timeout_s={config.request_timeout_s} must be > 0")
  if not config.buckets or min(config.buckets) < 1:
    raise ValueError(f"config.buckets must be positive batch sizes, got {list(config.buckets)}")
  if config.host not in ("127.0.0.1", "localhost", "::1"):
    logging.warning(
      "Serving on %s: reachable from other machines%s.",
      config.host,
      "" if (config.token or os.environ.get(TOKEN_ENV)) else " with no token (config.token)",
    )
    if config.allow_pickle:
      logging.warning("allow_pickle beyond loopback: any client can run code in this process.")
  os.makedirs(workdir, exist_ok=True)
  metrics.write_config_json(workdir, config)
  service = make_service(load_scorer(config), config)

  def on_ready(srv: server.Server) -> None:
    with fileio.atomic_writer(os.path.join(workdir, SERVER_FILE)) as f:
      f.write(json.dumps(dict(url=srv.url, pid=os.getpid(), **service.health()), indent=2).encode())
    logging.info("SpatialScore service on %s (buckets %s)", srv.url, service.batcher.buckets)

  def stop(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signum}")

  previous = signal.signal(signal.SIGTERM, stop)
  if config.serve_seconds:
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(int(config.serve_seconds))
  try:
    server.serve(service, config.host, config.port, on_ready)
  except KeyboardInterrupt as e:
    logging.info("Stopping the service (%s)", e or "interrupted")
  finally:
    signal.signal(signal.SIGTERM, previous)
    signal.alarm(0)
  stats = service.batcher.stats.as_dict()
  metrics.write_summary(workdir, dict(stats=stats))
  logging.info("Served: %s", json.dumps(stats))
  return stats
