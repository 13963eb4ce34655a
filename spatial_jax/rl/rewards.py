"""Rewards for GRPO, computed in-process on the decoded images.

- `spatial_score`: the mu of a SpatialScore model (`reward.spatial_score`: a `reward_train`
  workdir or an export folder; for smoke runs, a random tiny one: `reward.tiny_spatial_score`), the
  paper's reward. An `http://host:port` there scores on a `reward_serve` service instead (the 7B
  reward on other devices or hosts than the policy; token from $SPATIAL_SCORE_TOKEN), sent before
  the host rewards are computed, so the two overlap.
- `oracle_soft`: the oracle's graded verdict (`oracle.soft_fraction`): a dense version of
  `oracle` for training, with the same ground truth.
- `brightness`: the mean pixel value, only when it is trained on: a dense sanity reward.
- `oracle`: the synthetic world's rule-based checker (the fraction of the prompt's relations
  the image satisfies), the GenEval-like reward of the Flow-GRPO baseline. It reads prompts of
  the scene grammar only.
- `objects`: the fraction of the prompt's objects that the oracle's colour detector finds: a
  detector-style quality reward (GenEval's object and counting checks) that falls when images
  degrade, blind to where the objects are (computed when it is trained on).
- `reward.scorers`: any other scorer, name -> "module:function" with the signature of the
  rewards here (uint8 images (N, H, W, 3), prompts) -> (N,) float: the hook for real images'
  quality models.

Every available reward is computed and logged on each rollout. The advantages use
`reward.weights` (name -> weight; the non-zero ones are combined by `reward.aggregate`,
`advantages.aggregate_rewards`), or, when every weight is 0, `reward.train_on` alone.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import jax
import numpy as np
from absl import logging

from spatial_jax.data import oracle, scenes

REWARDS = ("spatial_score", "oracle", "oracle_soft", "objects", "brightness")
RewardFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def reward_weights(config: Any) -> dict[str, float]:
  """name -> weight of the rewards that drive the advantages: the non-zero `reward.weights`, or
  `{reward.train_on: 1.0}` when there are none.

  Raises:
    ValueError: an unknown reward name, a negative weight, or an unknown `reward.aggregate`.
  """
  from spatial_jax.rl.advantages import AGGREGATES

  r = config.reward
  known = (*REWARDS, *r.get("scorers", {}))
  weights = {k: float(v) for k, v in dict(r.get("weights", {})).items() if float(v) != 0.0}
  if not weights:
    weights = {r.train_on: 1.0}
  for name, weight in weights.items():
    if name not in known:
      raise ValueError(f"config.reward: unknown reward {name!r}; use one of {known}.")
    if weight < 0:
      raise ValueError(f"config.reward.weights.{name}={weight}: weights must be >= 0.")
  if r.get("aggregate", "advantage") not in AGGREGATES:
    raise ValueError(f"config.reward.aggregate={r.aggregate!r}; use one of {AGGREGATES}.")
  return weights


def oracle_soft_reward(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """The oracle's graded verdict (`oracle.soft_fraction`), (N,) float32: how far past each
  relation's margin the objects are, so that nearly-right layouts score above wrong ones."""
  out = []
  for image, prompt in zip(images, prompts, strict=True):
    scene = scenes.parse_prompt(prompt)
    out.append(oracle.soft_fraction(oracle.check_scene(image, scene), scene))
  return np.array(out, np.float32)


def objects_reward(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """Fraction of each prompt's objects the oracle's colour detector finds, (N,) float32."""
  return np.array(
    [np.mean(oracle.score_prompt(im, p).found) for im, p in zip(images, prompts, strict=True)],
    np.float32,
  )


def load_scorer(path: str) -> RewardFn:
  """A reward function from "module:function" (`reward.scorers`).

  Raises:
    ValueError: the path is not "module:function", or names nothing importable.
  """
  module_name, _, fn_name = path.partition(":")
  if not module_name or not fn_name:
    raise ValueError(f"config.reward.scorers: {path!r} is not 'module:function'.")
  try:
    fn = getattr(importlib.import_module(module_name), fn_name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"config.reward.scorers: cannot load {path!r}: {e}") from e
  if not callable(fn):
    raise ValueError(f"config.reward.scorers: {path!r} is not callable.")
  return fn


def brightness_reward(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """Mean pixel value in [0, 1], (N,) float32: a dense reward that ignores the prompt, for
  checking that the RL machinery climbs a reward at all (as DDPO's compressibility task)."""
  del prompts
  return np.asarray(images, np.float32).mean(axis=(1, 2, 3)) / 255.0


def oracle_reward(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """Fraction of each prompt's relations its image satisfies, (N,) float32."""
  return np.array(
    [oracle.score_prompt(im, p).fraction for im, p in zip(images, prompts, strict=True)],
    np.float32,
  )


def on_mesh(fn: RewardFn) -> bool:
  """Whether a reward runs on the devices (its batch split over the mesh, so every process
  passes every image), rather than on the host (each process scores its own rows)."""
  return bool(getattr(fn, "on_mesh", False))


def is_remote(path: str) -> bool:
  """Whether `reward.spatial_score` names a service rather than a folder."""
  return path.startswith(("http://", "https://"))


def remote_spatial_score(url: str, config: Any) -> RewardFn:
  """The `spatial_score` reward from a `reward_serve` service: a host reward (each process
  sends its own rows) with `submit` (a future), so `loop.score_images` can overlap it."""
  from spatial_jax.reward import client as client_lib  # numpy / PIL / stdlib only.

  client = client_lib.SpatialScoreClient(
    url,
    token=os.environ.get(client_lib.TOKEN_ENV),
    retry_s=config.reward.get("remote_retry_s", 300.0),
  )
  logging.info("spatial_score from the service at %s: %s", url, client.health())

  def spatial_score(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    return client.score(list(images), list(prompts))[0]

  def submit(images: np.ndarray, prompts: Sequence[str]) -> Future:
    future = Future()
    inner = client.score_async(list(images), list(prompts))
    inner.add_done_callback(
      lambda f: (
        future.set_exception(f.exception()) if f.exception() else future.set_result(f.result()[0])
      )
    )
    return future

  spatial_score.submit = submit
  return spatial_score


def load_spatial_score(config: Any, mesh: jax.sharding.Mesh):
  """The SpatialScore model `config.reward` names, or None when there is none."""
  from spatial_jax.reward.inference import SpatialScore  # Lazy: the Qwen stack.

  r = config.reward
  if r.spatial_score:
    return SpatialScore.load(r.spatial_score, mesh=mesh, batch_size=r.batch_size)
  if r.tiny_spatial_score:
    from spatial_jax import configs_lib

    logging.warning("config.reward has no SpatialScore path: a random tiny one (smoke).")
    tiny = configs_lib.load_config("configs/reward_synthetic.py", "smoke")
    tiny.seed = config.seed
    return SpatialScore.from_config(tiny, mesh=mesh, batch_size=r.batch_size)
  return None


def make_rewards(config: Any, mesh: jax.sharding.Mesh) -> dict[str, RewardFn]:
  """name -> fn(images uint8 (N, H, W, 3), prompts) -> (N,) float32, for each available reward.

  Raises:
    ValueError: a weighted reward (or `reward.train_on`) is unknown, or is not available with
      this config.
  """
  r = config.reward
  if r.train_on not in REWARDS:
    raise ValueError(f"config.reward.train_on={r.train_on!r}; use one of {REWARDS}.")
  weights = reward_weights(config)
  fns: dict[str, RewardFn] = {}
  model = None
  if is_remote(r.spatial_score):
    fns["spatial_score"] = remote_spatial_score(r.spatial_score, config)
  else:
    model = load_spatial_score(config, mesh)
  if model is not None:

    def spatial_score(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
      return model.score(images, prompts)[0]

    spatial_score.on_mesh = True  # One jitted call over the whole mesh (`on_mesh`).
    fns["spatial_score"] = spatial_score
  if r.oracle:
    fns["oracle"] = oracle_reward
    fns["oracle_soft"] = oracle_soft_reward
    if "objects" in weights:  # Else the evaluation's `oracle_objects` already reports it.
      fns["objects"] = objects_reward
  if "brightness" in weights:
    fns["brightness"] = brightness_reward
  for name, path in dict(r.get("scorers", {})).items():
    fns[name] = load_scorer(path)
  for name in weights:
    if name not in fns:
      raise ValueError(
        f"config.reward: the {name!r} reward drives training but is not available: set "
        + (
          "config.reward.spatial_score (a reward_train workdir or export)"
          if name == "spatial_score"
          else "config.reward.oracle=True (synthetic prompts only)"
        )
      )
  return fns
