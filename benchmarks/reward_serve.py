"""The SpatialScore service under load: requests/s and latency at 1, 4 and 16 concurrent
clients (loopback), against in-process scoring, with and without dynamic batching.

The service runs as its own process (`python -m spatial_jax.main --config
configs/reward_serve.py`), as a trainer would reach it; the clients are threads of this process
using `spatial_jax.reward.client` (PNG over JSON). Each client sends requests of
`--images_per_request` rendered synthetic scenes back to back for `--seconds`. Two services:

- `batched`: the config's buckets (8, 32, 128): concurrent requests are packed into one call;
- `one-at-a-time`: a single bucket the size of one request, so each call scores one request.

In-process: `SpatialScore.score` on the same requests, one after another, in this process
(the figure a trainer with the reward on its own devices would get). The model is the
untrained tiny synthetic SpatialScore unless `--model_path` names a workdir or an export (the
network does not change the serving cost much; the size does).

  python benchmarks/reward_serve.py --seconds 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from timing import environment, warn_if_busy  # noqa: E402  (benchmarks/)

from spatial_jax.data import render, scenes  # noqa: E402
from spatial_jax.reward import client as client_lib  # noqa: E402


def _requests(n: int, size: int, seed: int = 0) -> list[tuple[list[np.ndarray], list[str]]]:
  rng = np.random.default_rng(seed)
  out = []
  for r in range(16):
    images, prompts = [], []
    for k in range(n):
      scene = scenes.sample_scene(rng)
      images.append(render.render_scene(scene, seed=r * n + k, size=size))
      prompts.append(scenes.scene_to_prompt(scene, rng))
    out.append((images, prompts))
  return out


def _start_service(workdir: str, buckets: tuple[int, ...], model_path: str) -> tuple:
  args = [
    sys.executable,
    "-m",
    "spatial_jax.main",
    f"--config=configs/reward_serve.py{'' if model_path else ':smoke'}",
    f"--workdir={workdir}",
    "--config.port=0",
    f"--config.buckets={buckets}",
    "--config.max_queue=256",
  ] + ([f"--config.model_path={model_path}"] if model_path else [])
  log = open(os.path.join(workdir + ".log"), "w")
  process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
  info_file = os.path.join(workdir, "server.json")
  deadline = time.time() + 600
  while not os.path.exists(info_file):
    if process.poll() is not None or time.time() > deadline:
      raise RuntimeError(f"The service did not start; see {log.name}")
    time.sleep(0.5)
  with open(info_file) as f:
    return process, json.load(f)["url"]


def _rates(latencies: list[float], elapsed: float, images_per_request: int) -> dict:
  lat = np.asarray(latencies) * 1e3
  return dict(
    requests_per_s=len(lat) / elapsed,
    images_per_s=len(lat) * images_per_request / elapsed,
    p50_ms=float(np.percentile(lat, 50)),
    p99_ms=float(np.percentile(lat, 99)),
  )


def _load(url: str, clients: int, seconds: float, requests: list) -> dict:
  """`clients` threads sending requests back to back for `seconds`."""
  latencies: list[float] = []
  lock = threading.Lock()
  stop = time.perf_counter() + seconds

  def worker(index: int) -> None:
    client = client_lib.SpatialScoreClient(url, max_images_per_request=10**6)
    k = index
    while time.perf_counter() < stop:
      images, prompts = requests[k % len(requests)]
      started = time.perf_counter()
      client.score(images, prompts)
      with lock:
        latencies.append(time.perf_counter() - started)
      k += clients

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
  started = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return _rates(latencies, time.perf_counter() - started, len(requests[0][0]))


def _in_process(requests: list, seconds: float, model_path: str) -> dict:
  from spatial_jax import configs_lib
  from spatial_jax.reward.inference import SpatialScore

  n = len(requests[0][0])
  if model_path:
    scorer = SpatialScore.load(model_path, batch_size=n)
  else:
    scorer = SpatialScore.from_config(
      configs_lib.load_config("configs/reward_synthetic.py", "smoke"), batch_size=n
    )
  scorer.score(*requests[0])  # Compiles.
  latencies, stop, k = [], time.perf_counter() + seconds, 0
  started = time.perf_counter()
  while time.perf_counter() < stop:
    t = time.perf_counter()
    scorer.score(*requests[k % len(requests)])
    latencies.append(time.perf_counter() - t)
    k += 1
  return _rates(latencies, time.perf_counter() - started, n)


def _median(runs: list[dict]) -> dict:
  out = {}
  for key in runs[0]:
    values = [r[key] for r in runs]
    out[key] = round(statistics.median(values), 2)
    out[key + "_range"] = [round(min(values), 2), round(max(values), 2)]
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=20.0, help="per load level and repeat")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
  parser.add_argument("--images_per_request", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--model_path", default="")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args()
  warn_if_busy()
  requests = _requests(args.images_per_request, args.image_size)
  results = dict(
    environment=environment(),
    args=vars(args),
    in_process=_median(
      [_in_process(requests, args.seconds, args.model_path) for _ in range(args.repeats)]
    ),
  )
  services = {"batched": (8, 32, 128), "one-at-a-time": (args.images_per_request,)}
  with tempfile.TemporaryDirectory() as tmp:
    for name, buckets in services.items():
      process, url = _start_service(os.path.join(tmp, name), buckets, args.model_path)
      try:
        _load(url, 1, 2.0, requests)  # Warm-up: connections, first calls.
        results[name] = {
          str(c): _median([_load(url, c, args.seconds, requests) for _ in range(args.repeats)])
          for c in args.clients
        }
      finally:
        process.terminate()
        process.wait(60)
  for c in map(str, args.clients):
    results.setdefault("batching_gain", {})[c] = round(
      results["batched"][c]["requests_per_s"] / results["one-at-a-time"][c]["requests_per_s"], 2
    )
  text = json.dumps(results, indent=2)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
