"""The `reward_serve` job from the command line: it starts, writes server.json, answers the
client, stops cleanly on SIGTERM with its counters in summary.json; a missing model is a clear
error."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from spatial_jax.reward import client

pytestmark = pytest.mark.slow  # A JAX process of its own.

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(workdir, *args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "spatial_jax.main", f"--workdir={workdir}", *args]
  return subprocess.Popen(
    command, cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def test_smoke_service_answers_and_stops_on_sigterm(tmp_path):
  workdir = tmp_path / "serve"
  process = _start(workdir, "--config=configs/reward_serve.py:smoke")
  try:
    deadline = time.time() + 240
    while not (workdir / "server.json").exists():
      assert process.poll() is None, process.communicate()[1][-3000:]
      assert time.time() < deadline, "the service did not start"
      time.sleep(0.5)
    info = json.loads((workdir / "server.json").read_text())
    assert info["url"].startswith("http://127.0.0.1:") and info["buckets"] == [4, 16]
    remote = client.SpatialScoreClient(info["url"])
    assert remote.health()["model"] == "(untrained)"
    images = np.zeros((5, 32, 32, 3), np.uint8)
    mu, sigma = remote.score(list(images), "a red circle left of a blue square")
    assert mu.shape == sigma.shape == (5,) and np.isfinite(mu).all() and (sigma > 0).all()
  finally:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
  assert process.returncode == 0, stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["stats"]["requests"] == 1 and summary["stats"]["rows"] == 5


def test_a_service_without_a_model_fails_clearly(tmp_path):
  process = _start(tmp_path / "serve", "--config=configs/reward_serve.py", "--config.port=0")
  _, stderr = process.communicate(timeout=240)
  assert process.returncode == 1
  assert "config.model_path must name a reward_train workdir" in stderr.strip().splitlines()[-1]
