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
  "data_synthetic": "spatial_jax.jobs.data_synthetic:run",
  "reward_train": "spatial_jax.jobs.reward_train:run",
  "reward_eval": "spatial_jax.jobs.reward_eval:run",
  "reward_serve": "spatial_jax.jobs.reward_serve:run",
  "text_encoder_synthetic": "spatial_jax.jobs.text_encoder_synthetic:run",
  "flux_sft": "spatial_jax.jobs.flux_sft:run",
  "grpo": "spatial_jax.jobs.grpo:run",
  "sample": "spatial_jax.jobs.sample:run",
  "quickstart": "spatial_jax.jobs.quickstart:run",
  "reproduce": "spatial_jax.jobs.reproduce:run",
  "pairs_generate": "spatial_jax.jobs.pairs_generate:run",
  "plan": "spatial_jax.jobs.plan:run",
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
