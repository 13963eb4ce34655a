"""The training phase of one GRPO step with top-k filtering (G=24, k=6) vs without (k=None).

The paper keeps the top-k and bottom-k rewards of each group of G: 2k = 12 of 24 trajectories are
trained, which should halve the training phase (its forward + backward passes scale with the
number of trained samples). One rollout of P prompts x 24 samples from the synthetic world's
generator architecture (random weights: the timing does not depend on them) is scored, and the
training phase (`rl.loop.update`: the train step on every trained timestep, one optimizer update
per minibatch) runs on the kept 12 per group vs all 24, from the same rollout and the same state.
Prints the median times and their ratio (k=6 / k=None; expected near 0.5).

  python benchmarks/grpo_step.py            # CPU, fp32, from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_time  # noqa: E402  (benchmarks/)

from spatial_jax import sharding  # noqa: E402
from spatial_jax.configs_lib import load_config  # noqa: E402
from spatial_jax.diffusion import text_to_image  # noqa: E402
from spatial_jax.rl import advantages, loop, steps  # noqa: E402


def flux_sft_generator() -> dict:
  """The flux_sft_synthetic generator's architecture, as `config.model.tiny` describes one."""
  sft = load_config("configs/flux_sft_synthetic.py")
  return dict(
    max_length=sft.text.max_length,
    scale_factor=sft.codec.scale_factor,
    t5=dict(sft.text.t5),
    clip=dict(sft.text.clip),
    flux=dict(sft.model.flux),
  )


def jitted_policy(config):
  """One device's mesh and rules, the policy of `config` (a random generator of its
  architecture), its (graphdef, trainable, frozen) split, optimizer and jitted GRPO phases."""
  mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
  rules = sharding.resolve_rules(None)
  pol = text_to_image.load_text_to_image(config, mesh, rules)
  split = nnx.split(pol.transformer, nnx.LoRAParam, ...)
  tx = steps.make_optimizer(config)
  phases = loop.jit_phases(*split, pol, tx, config, mesh, rules)
  return mesh, rules, pol, split, tx, phases


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", type=int, default=1, help="P prompts per step")
  parser.add_argument("--group", type=int, default=24, help="G samples per prompt")
  parser.add_argument("--topk", type=int, default=6, help="k of the filtered run")
  parser.add_argument("--steps", type=int, default=10, help="SDE steps of the rollout")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="", help="append a JSON line of results here")
  args = parser.parse_args()

  config = load_config("configs/grpo_synthetic.py")
  config.model.tiny = flux_sft_generator()
  config.sampling.update(num_steps=args.steps, cfg_scale=4.0)
  config.grpo.update(prompts_per_step=args.prompts, group_size=args.group)
  config.sampling.sde_window = (0, args.steps - 1)
  config.train.num_minibatches = 1
  mesh, rules, pol, (graphdef, trainable, frozen), tx, phases = jitted_policy(config)

  prompts = ["a red circle left of a blue square above a green star"] * args.prompts
  with sharding.use_mesh(mesh, rules):
    opt_state = jax.jit(tx.init)(trainable)
    roll = loop.rollout(phases, pol, trainable, frozen, prompts, jax.random.key(0))
  rewards = jax.random.uniform(jax.random.key(1), (args.prompts, args.group))
  state = [trainable, opt_state]  # The train step donates them: each call takes the last.

  def phase(k):
    adv, mask = advantages.topk_group_advantages(rewards, k)
    scored = loop.Scored(rewards={}, reward=rewards, advantages=adv, mask=mask)
    batches = loop.minibatches(phases, roll, scored, config, step=0)

    def run():
      with sharding.use_mesh(mesh, rules):
        state[:] = loop.update(phases, *state, frozen, batches)[:2]

    return int(np.sum(mask)), median_time(run, args.repeats)

  kept_all, t_all = phase(None)
  kept_topk, t_topk = phase(args.topk)
  result = dict(
    date=time.strftime("%Y-%m-%d"),
    machine=f"{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].platform}",
    group=args.group,
    topk=args.topk,
    prompts=args.prompts,
    trained_timesteps=len(phases.timesteps),
    trained_samples=dict(topk=kept_topk, all=kept_all),
    seconds=dict(topk=round(t_topk, 3), all=round(t_all, 3)),
    ratio=round(t_topk / t_all, 3),
  )
  print(json.dumps(result))
  if args.out:
    with open(args.out, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
