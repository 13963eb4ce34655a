"""Job registry: `config.job` -> the `run(config, workdir)` that carries it out.

Jobs are referenced by import path and imported only when selected, so running
one job never imports another's heavy dependencies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

Job = Callable[[Any, str], Any]

# name -> "module:function". Later stages add their jobs here.
JOBS: dict[str, str] = {
  "data_synthetic": "spatial_jax.data.synthetic_job:run",
  "reward_train": "spatial_jax.reward.train:run",
  "reward_eval": "spatial_jax.reward.evaluate_job:run",
  "text_encoder_synthetic": "spatial_jax.diffusion.text_encoder_job:run",
  "flux_sft": "spatial_jax.diffusion.sft_job:run",
  "grpo": "spatial_jax.rl.train:run",
  "sample": "spatial_jax.diffusion.sample_job:run",
  "quickstart": "spatial_jax.quickstart:run",
  "pairs_generate": "spatial_jax.data.pairs_generate:run",
  "plan": "spatial_jax.plan:run",
}


def get_job(name: str) -> Job:
  """Returns the run function of job `name`.

  Raises:
    ValueError: `name` is not a registered job (the known ones are listed).
  """
  if name not in JOBS:
    raise ValueError(f"Unknown job {name!r} (config.job); registered jobs: {sorted(JOBS)}.")
  module_name, _, function_name = JOBS[name].partition(":")
  return getattr(importlib.import_module(module_name), function_name)
