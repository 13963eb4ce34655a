"""SpatialScore as a reward of a PyTorch trainer (Flow-GRPO's reward-function signature).

Start the service (JAX side), e.g. on the GPUs or host that hold the reward model:

  python -m spatial_jax.main --config configs/reward_serve.py --workdir workdirs/serve \
    --config.model_path=workdirs/reward

then, in Flow-GRPO's `flow_grpo/rewards.py`, register it beside the other scorers:

  from flow_grpo_reward import spatial_score           # this file, on the PYTHONPATH
  score_functions["spatial_score"] = spatial_score     # multi_score(device, {"spatial_score": 1.0})

The function needs requests, numpy and PIL only (no JAX, no spatial_jax). Images go as PNG in
the service's JSON protocol (lossless; the safe default, no pickle). Scores are SpatialScore's mu
(higher: the image follows the prompt's spatial relations better); sigma is returned in the
details. Retries ride out a restarting or busy service (502/503/504, refused connections).

  python examples/flow_grpo_reward.py http://127.0.0.1:8123   # scores two noise images
"""

from __future__ import annotations

import base64
import io
import os
import sys

import numpy as np
import requests
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry


def _uint8_nhwc(images) -> np.ndarray:
  """Flow-GRPO passes a float tensor (N, C, H, W) in [0, 1] or uint8 arrays (N, H, W, C)."""
  if hasattr(images, "detach"):  # A torch tensor, without importing torch here.
    images = images.detach().float().cpu().numpy()
  images = np.asarray(images)
  if np.issubdtype(images.dtype, np.floating):
    images = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
  if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
    images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
  return images


def _png_base64(image: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(image).convert("RGB").save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode("ascii")


def spatial_score(device=None, url: str | None = None, batch_size: int = 64, timeout: float = 300):
  """A Flow-GRPO reward factory: returns `fn(images, prompts, metadata) -> (scores, details)`.

  `url` defaults to $SPATIAL_SCORE_URL or http://127.0.0.1:8123; a bearer token is read from
  $SPATIAL_SCORE_TOKEN. `device` is unused (the model runs in the service).
  """
  del device
  url = (url or os.environ.get("SPATIAL_SCORE_URL", "http://127.0.0.1:8123")).rstrip("/")
  session = requests.Session()
  retries = Retry(
    total=30, backoff_factor=1, status_forcelist=[502, 503, 504], allowed_methods=False
  )
  session.mount("http://", HTTPAdapter(max_retries=retries))
  session.mount("https://", HTTPAdapter(max_retries=retries))
  token = os.environ.get("SPATIAL_SCORE_TOKEN")
  headers = {"Authorization": f"Bearer {token}"} if token else {}

  def _fn(images, prompts, metadata=None):
    del metadata  # The prompt carries what SpatialScore reads.
    images = _uint8_nhwc(images)
    mus, sigmas = [], []
    for start in range(0, len(images), batch_size):
      body = {
        "images": [_png_base64(im) for im in images[start : start + batch_size]],
        "prompts": [str(p) for p in prompts[start : start + batch_size]],
      }
      response = session.post(f"{url}/score", json=body, headers=headers, timeout=timeout)
      if response.status_code != 200:
        raise RuntimeError(f"SpatialScore service: HTTP {response.status_code}: {response.text}")
      answer = response.json()
      mus += answer["mu"]
      sigmas += answer["sigma"]
    return np.asarray(mus, np.float32), {"spatial_score_sigma": np.asarray(sigmas, np.float32)}

  return _fn


if __name__ == "__main__":
  fn = spatial_score(url=sys.argv[1] if len(sys.argv) > 1 else None)
  noise = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)  # NCHW in [0, 1]
  scores, details = fn(noise, ["a red circle left of a blue square"] * 2, [{}, {}])
  print("mu", scores, "sigma", details["spatial_score_sigma"])
