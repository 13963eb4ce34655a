"""How well a SpatialScore ranks a generator's own GRPO rollouts, with the oracle as ground truth
(docs/results/grpo_synthetic.md).

It draws the rollouts of the quickstart's GRPO stage (its config, the base generator, no
training): P prompts x G SDE samples, and scores every image with SpatialScore and the oracle.
Within each group, over the pairs of images the oracle tells apart, it reports how often
SpatialScore orders them the same way: overall, when the worse image lacks a named object, and
when it shows every object. It also gives the oracle's mean over the top-k and bottom-k that
GRPO would keep.

  python docs/results/reward_on_rollouts.py QUICKSTART_WORKDIR [STEPS] [REWARD]
  # from the repository root; REWARD: another SpatialScore (default: QUICKSTART_WORKDIR/reward)
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from flax import nnx

from spatial_jax import configs_lib, sharding
from spatial_jax.data import oracle
from spatial_jax.diffusion import text_to_image
from spatial_jax.rl import advantages, loop
from spatial_jax.rl import rewards as rewards_lib
from spatial_jax.rl import steps as steps_lib


def main(workdir: str, steps: int, reward: str) -> None:
  quickstart = configs_lib.load_config("configs/quickstart.py")
  quickstart.seed = json.load(open(os.path.join(workdir, "config.json")))["seed"]
  config = quickstart.grpo
  config.seed = quickstart.seed
  config.model.generator = os.path.join(workdir, "generator", "final")
  config.reward.spatial_score = reward
  mesh, rules = sharding.make_mesh(config.mesh), sharding.resolve_rules(config.sharding_rules)
  policy = text_to_image.load_text_to_image(config, mesh, rules)
  graphdef, trainable, frozen = nnx.split(policy.transformer, nnx.LoRAParam, ...)
  reward_fns = rewards_lib.make_rewards(config, mesh)
  prompts = loop.prompt_source(config)
  tx = steps_lib.make_optimizer(config)
  phases = loop.jit_phases(graphdef, trainable, frozen, policy, tx, config, mesh, rules)
  P, k = config.grpo.prompts_per_step, loop.kept_topk(config)
  proxies, golds, fulls = [], [], []  # (P, G) per step
  with sharding.use_mesh(mesh, rules):
    for step in range(1, steps + 1):
      key = jax.random.fold_in(jax.random.key(config.seed), step)
      roll = loop.rollout(phases, policy, trainable, frozen, prompts.train(step, P), key)
      scores = loop.score_images(phases, reward_fns, roll.images, roll.group_prompts)
      proxies.append(scores["spatial_score"].reshape(P, -1))
      golds.append(scores["oracle"].reshape(P, -1))
      images = zip(roll.images, roll.group_prompts, strict=True)
      fulls.append(np.array([all(oracle.score_prompt(im, p).found) for im, p in images]))
  proxy, gold = np.concatenate(proxies), np.concatenate(golds)
  full = np.concatenate(fulls).reshape(gold.shape)
  result = {}
  for name, worse in (
    ("all", None),
    ("worse_misses_an_object", ~full),
    ("worse_shows_every_object", full),
  ):
    agreement, pairs = advantages.group_pair_agreement(proxy, gold, worse)
    result[name] = {"agreement": round(float(agreement), 3), "pairs": int(pairs)}
  order = np.argsort(proxy, axis=1)  # What GRPO keeps: the top-k and bottom-k by the reward.
  result["oracle_top_k"] = round(float(np.take_along_axis(gold, order[:, -k:], 1).mean()), 3)
  result["oracle_bottom_k"] = round(float(np.take_along_axis(gold, order[:, :k], 1).mean()), 3)
  print(json.dumps(dict(workdir=workdir, reward=reward, steps=steps, **result)))


if __name__ == "__main__":
  workdir = sys.argv[1]
  main(
    workdir,
    int(sys.argv[2]) if len(sys.argv) > 2 else 12,
    sys.argv[3] if len(sys.argv) > 3 else os.path.join(workdir, "reward"),
  )
