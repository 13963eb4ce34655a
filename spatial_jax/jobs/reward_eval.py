"""Job `reward_eval`: pairwise accuracy of a SpatialScore model on any pairs folder.

`config.model_path` is a training workdir or an export folder (`SpatialScore.load`), or one of
two reference points of the synthetic world:

- "oracle": the pixel oracle's fraction of satisfied relations as mu (sigma 0). It is exact on
  synthetic pairs, so it gives the ceiling (accuracy 1.0) a learned model is measured against.
- "untrained": a freshly initialised model of `configs/reward_synthetic.py`: the chance floor.

Writes `<workdir>/eval.json`: `EvalResult.as_dict()` plus the model path, pairs folder, split and
pair count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from spatial_jax import configs_lib, metrics
from spatial_jax.reward import evaluate

ORACLE = "oracle"
UNTRAINED = "untrained"
UNTRAINED_CONFIG = "configs/reward_synthetic.py"
RESULT_FILE = "eval.json"


class OracleScore:
  """The synthetic world's pixel oracle behind the `SpatialScore.score` interface."""

  image_size = None  # The oracle reads images at their own resolution.

  def score(self, images: Sequence[Any], prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    from spatial_jax.data import oracle

    mu = []
    for image, prompt in zip(images, prompts, strict=True):
      try:
        mu.append(oracle.score_prompt(np.asarray(image), prompt).fraction)
      except ValueError as e:
        raise ValueError(
          f"model_path='oracle' reads synthetic-world prompts only; {prompt!r}: {e}"
        ) from e
    mu = np.asarray(mu, np.float32)
    return mu, np.zeros_like(mu)


def load_scorer(config: Any) -> Any:
  """A `SpatialScore` (or the oracle) for `config.model_path`, on the mesh of `config.mesh`."""
  if config.model_path == ORACLE:
    return OracleScore()
  from spatial_jax import sharding
  from spatial_jax.reward.inference import SpatialScore

  mesh = sharding.make_mesh(config.mesh)
  batch_size = 2 * config.batch_size  # Sequences: each pair's chosen and rejected image.
  if config.model_path == UNTRAINED:
    from spatial_jax.configs_lib import load_config

    model_config = load_config(UNTRAINED_CONFIG)
    model_config.seed = config.seed
    return SpatialScore.from_config(model_config, mesh=mesh, batch_size=batch_size)
  return SpatialScore.load(config.model_path, mesh=mesh, batch_size=batch_size)


def _pairs_folder(config: Any) -> str:
  if config.pairs:
    return config.pairs
  # A training workdir keeps its synthetic pairs in `pairs/`: evaluate on its held-out split.
  default = os.path.join(config.model_path, "pairs")
  if os.path.isdir(default):
    return default
  raise ValueError(
    f"config.pairs is empty and {config.model_path!r} has no pairs/ folder; name a pairs folder"
  )


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Scores every pair of `config.split` (up to `config.max_pairs`) and writes eval.json."""
  configs_lib.check_sizes(config, {"max_pairs": 0, "batch_size": 1})
  if not config.model_path:
    raise ValueError(
      "config.model_path is empty: give a training workdir, an export folder, 'oracle' or "
      "'untrained'"
    )
  pairs_dir = _pairs_folder(config)
  scorer = load_scorer(config)
  eval_pairs = evaluate.load_eval_pairs(
    pairs_dir, config.split, max_pairs=config.max_pairs, image_size=scorer.image_size
  )
  # evaluate() prepares and scores `eval.batch_size` pairs at a time; here the scorer prepares
  # its own inputs (resizing, chunking, padding), so the "preparer" only passes them through.
  eval_config = ml_collections.ConfigDict(dict(eval=dict(batch_size=config.batch_size)))
  result = evaluate.evaluate(
    lambda batch: scorer.score(*batch),
    lambda images, prompts: (images, prompts),
    eval_pairs,
    eval_config,
  )
  summary = dict(
    result.as_dict(),
    model_path=config.model_path,
    pairs=pairs_dir,
    split=config.split,
    count=len(eval_pairs),
    step=getattr(scorer, "step", None),
  )
  metrics.write_summary(workdir, summary, name=RESULT_FILE)
  logging.info("%s on %s/%s: %s", config.model_path, pairs_dir, config.split, result.summary())
  return summary
