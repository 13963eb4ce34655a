"""One process of `multiprocess_test.py` (run as a script, not collected by pytest).

  python tests/multiprocess_worker.py --out DIR --pairs PAIRS --process_id I --num_processes 2 \
      --coordinator 127.0.0.1:PORT        # one of the two processes (4 CPU devices each)
  python tests/multiprocess_worker.py --out DIR --pairs PAIRS   # the reference: 1 process, 8

The environment (JAX_PLATFORMS=cpu, XLA_FLAGS with the device count) is set by the test. Both
runs use the same 2 x 2 x 2 (data, fsdp, tensor) mesh over 8 devices, and the same global
batches:

- reward: 2 train steps on 4 pairs per step. Each of the two processes loads ITS shard of the
  pairs (2 per step, the loader's `shard_index`) and the global batch is assembled with
  `reward.build.global_pair_inputs`; the reference loads both shards and concatenates them.
- GRPO: the rollout of 2 prompts x 8 samples and one train step. Each process passes its rows
  (one prompt's group) of the prompt embeddings and of the advantages; the global batch is
  assembled with `sharding.process_local_to_global`.

Writes `<out>/<name>.npz` (name: `process_<i>` or `reference`) with the losses, metrics and the
updated parameters (gathered to every process), and `<out>/<name>.done` last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

MESH = [("data", 2), ("fsdp", 2), ("tensor", 2)]
PROMPTS = ["a red circle left of a blue square", "a green star above a yellow triangle"]


def _gather(tree):
  """Host numpy copies of (possibly multi-process) arrays, the same on every process."""
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _flat(prefix, tree):
  return {
    f"{prefix}{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)
  }


def reward_steps(pairs_dir: str) -> dict[str, np.ndarray]:
  from flax import nnx

  from spatial_jax import sharding
  from spatial_jax.configs_lib import load_config
  from spatial_jax.data import loader
  from spatial_jax.reward import build
  from spatial_jax.reward import step as reward_step
  from spatial_jax.reward.model import trainable_filter

  config = load_config("configs/reward_synthetic.py", "smoke")
  config.data.pairs = pairs_dir
  mesh, rules = sharding.make_mesh(MESH), sharding.resolve_rules(None)
  built = build.build(config, None, mesh, rules)
  graphdef, trainable, frozen = nnx.split(built.model, trainable_filter("all"), ...)
  tx = reward_step.make_optimizer(config)
  replicated = sharding.named_sharding(mesh, (), rules)
  step = jax.jit(
    reward_step.make_train_step(graphdef, tx, config, jax.random.key(0)),
    donate_argnums=(0, 1),
    out_shardings=(sharding.state_shardings(trainable, mesh, rules), None, replicated),
  )
  # Two shards of 2 pairs per step; this process reads its own, the reference both.
  shard_index, shard_count = sharding.process_batch_shard(mesh, rules)
  shards = [shard_index] if jax.process_count() > 1 else range(2)
  loaders = [
    loader.make_pairs_loader(
      pairs_dir, batch_size=2, image_size=32, seed=0, shard_index=i, shard_count=2
    )
    for i in shards
  ]
  assert jax.process_count() == 1 or shard_count == 2, shard_count
  losses = []
  with sharding.use_mesh(mesh, rules):
    opt_state = jax.jit(tx.init)(trainable)
    for i in (1, 2):
      parts = [next(it) for it in loaders]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      inputs = build.global_pair_inputs(built.preparer, batch, mesh, rules)
      assert inputs.input_ids.shape[0] == 8 and inputs.input_ids.sharding.spec[0] == (
        "data",
        "fsdp",
      )
      trainable, opt_state, aux = step(trainable, opt_state, frozen, inputs, i)
      losses.append(float(aux["loss"]))
  return {"reward/loss": np.asarray(losses), **_flat("reward/params", _gather(trainable))}


def grpo_step() -> dict[str, np.ndarray]:
  import jax.numpy as jnp
  from flax import nnx

  from spatial_jax import sharding
  from spatial_jax.configs_lib import load_config
  from spatial_jax.diffusion import text_to_image
  from spatial_jax.diffusion.schedule import FlowMatchSchedule
  from spatial_jax.rl import steps

  config = load_config("configs/grpo_synthetic.py", "smoke")
  mesh, rules = sharding.make_mesh(MESH), sharding.resolve_rules(None)
  policy = text_to_image.load_text_to_image(config, mesh, rules)
  graphdef, trainable, frozen = nnx.split(policy.transformer, nnx.LoRAParam, ...)
  n = config.sampling.num_steps
  sigmas = jnp.asarray(FlowMatchSchedule().sigmas(n, policy.geo.image_seq_len))
  tx = steps.make_optimizer(config)
  replicated = sharding.named_sharding(mesh, (), rules)
  rollout = jax.jit(steps.make_rollout(graphdef, policy, sigmas, config))
  train_step = jax.jit(
    steps.make_train_step(graphdef, tx, policy, sigmas, steps.trained_timesteps(config, n), config),
    out_shardings=(sharding.state_shardings(trainable, mesh, rules), None, replicated),
  )
  group = config.grpo.group_size
  # This process's rows of the global batch (all of them in the reference): its prompt's group.
  index, count = sharding.process_batch_shard(mesh, rules)
  rows = np.arange(len(PROMPTS) * group).reshape(count, -1)[index]
  advantages = np.random.default_rng(1).normal(size=len(PROMPTS) * group).astype(np.float32)

  def to_global(x, batch_axis=0):
    names = [None] * np.ndim(x)
    names[batch_axis] = "act_batch"
    return sharding.process_local_to_global(x, sharding.named_sharding(mesh, tuple(names), rules))

  with sharding.use_mesh(mesh, rules):
    # The text encoder runs on the global mesh: every process encodes the same (all) prompts,
    # and each keeps its rows (the encoder output may be sharded across processes: gathered).
    embeds, pooled = (
      to_global(np.repeat(_gather(x), group, axis=0)[rows]) for x in policy.encode(PROMPTS)
    )
    opt_state = jax.jit(tx.init)(trainable)
    traj = rollout(trainable, frozen, embeds, pooled, jax.random.key(0))
    batch = dict(
      latents=traj.latents,
      log_probs=traj.log_probs,
      advantages=to_global(advantages[rows]),
      mask=to_global(np.ones(len(rows), bool)),
      prompt_embeds=embeds,
      pooled=pooled,
    )
    assert batch["advantages"].shape == (len(PROMPTS) * group,)
    new, _, m = train_step(trainable, opt_state, frozen, batch)
  out = {f"grpo/{k}": np.asarray(v) for k, v in m.items()}
  out["grpo/latents"] = _gather(traj.latents)
  out.update(_flat("grpo/params", _gather(new)))
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--pairs", required=True)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--coordinator", default="")
  args = parser.parse_args()
  start = time.time()
  if args.num_processes > 1:
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=60,
    )
  jax.config.update("jax_threefry_partitionable", True)  # As main.py.
  assert jax.device_count() == 8, jax.devices()
  name = f"process_{jax.process_index()}" if args.num_processes > 1 else "reference"
  results = reward_steps(args.pairs)
  reward_secs = time.time() - start
  results.update(grpo_step())
  np.savez(os.path.join(args.out, f"{name}.npz"), **results)
  with open(os.path.join(args.out, f"{name}.done"), "w") as f:
    f.write(f"reward {reward_secs:.1f}s, total {time.time() - start:.1f}s\n")
  print(f"{name}: reward {reward_secs:.1f}s, total {time.time() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
  main()
