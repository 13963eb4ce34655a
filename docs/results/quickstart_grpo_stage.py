"""The quickstart's GRPO stage alone on a finished quickstart workdir, with overrides.

  python docs/results/quickstart_grpo_stage.py QS_WORKDIR SEED OUT [section.key=value ...]

The stage evaluates every 20 steps (the evaluation noise is fixed, so the quickstart's step-40
figures are the same). Run from the repository root.
"""

import ast
import os
import sys

from spatial_jax import configs_lib
from spatial_jax.jobs import grpo as grpo_job


def main():
  qs, seed, out, *overrides = sys.argv[1:]
  config = configs_lib.load_config("configs/quickstart.py").grpo
  config.seed = int(seed)
  config.model.generator = os.path.join(qs, "generator", "final")
  config.reward.spatial_score = os.path.join(qs, "reward")
  for item in overrides:
    key, value = item.split("=", 1)
    *path, last = key.split(".")
    node = config
    for p in path:
      node = node[p]
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    node[last] = value
  config.eval.every_steps = 20
  grpo_job.run(config, out)


if __name__ == "__main__":
  main()
