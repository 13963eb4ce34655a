"""One GRPO step as public phases: what the `grpo` job, the GRPO colab, `plan` and the benchmark
all call, so the step exists once.

  phases = jit_phases(graphdef, trainable, frozen, policy, tx, config, mesh, rules)
  roll = rollout(phases, policy, trainable, frozen, step_prompts, key)   # SDE samples, decoded
  scored = score(phases, roll, reward_fns, config)                       # rewards, advantages
  batches = minibatches(phases, roll, scored, config, step)              # kept samples, placed
  trainable, opt_state, aux = update(phases, trainable, opt_state, frozen, batches)
  scalars = step_scalars(aux, scored)                                    # what the step logs

`jit_phases` jits the rollout, the train step and the deterministic (ODE) sampler with explicit
input shardings (parameters by their logical names, batches split over `act_batch` along their
sample axis, keys replicated) and the train step's outputs placed where its inputs were, the
trainable state and optimizer state donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spatial_jax import sharding
from spatial_jax.data.prompts import PromptSource
from spatial_jax.diffusion import generator as generator_lib
from spatial_jax.diffusion import text_to_image
from spatial_jax.diffusion.schedule import FlowMatchSchedule
from spatial_jax.diffusion.sde import SDE_TYPES, SDETrajectory
from spatial_jax.diffusion.text_to_image import TextToImage
from spatial_jax.rl import advantages as advantages_lib
from spatial_jax.rl import grpo as grpo_lib
from spatial_jax.rl import rewards as rewards_lib
from spatial_jax.rl import steps as steps_lib

# The sample axis of each train-batch entry (the rollout's latents and log-probs lead with steps).
# `means` is there only with `grpo.ratio_norm`; a batch also carries its `timesteps` (replicated).
BATCH_AXES = dict(latents=1, log_probs=1, advantages=0, mask=0, prompt_embeds=0, pooled=0, means=1)


def batch_keys(config: Any) -> tuple[str, ...]:
  """The sample-split entries of a train batch under `config`."""
  keys = [k for k in BATCH_AXES if k != "means"]
  return tuple(keys + ["means"]) if config.grpo.get("ratio_norm", False) else tuple(keys)


def check_config(config: Any, batch_shards: int) -> None:
  """Clear errors for group and batch sizes that cannot work (before anything is built)."""
  from spatial_jax import configs_lib

  configs_lib.check_sizes(
    config,
    {
      "grpo.prompts_per_step": 1,
      "train.steps": 1,
      "train.num_minibatches": 1,
      "sampling.num_steps": 2,
      "eval.num_prompts": 1,
      "eval.num_steps": 1,
      "eval.every_steps": 0,
    },
  )
  if "num_long_prompts" in config.eval:
    configs_lib.check_sizes(config, {"eval.num_long_prompts": 0})
  g, t = config.grpo, config.train
  steps_lib.sde_window(config, config.sampling.num_steps)  # Clear errors for a bad window.
  if config.sampling.get("sde_type", "sde") not in SDE_TYPES:
    raise ValueError(
      f"config.sampling.sde_type={config.sampling.sde_type!r}; use one of {SDE_TYPES}."
    )
  if g.get("kl_target", "mean") not in grpo_lib.KL_TARGETS:
    raise ValueError(f"config.grpo.kl_target={g.kl_target!r}; use one of {grpo_lib.KL_TARGETS}.")
  rewards_lib.reward_weights(config)  # Clear errors for unknown rewards or aggregations.
  if g.group_size < 2:
    raise ValueError(f"config.grpo.group_size={g.group_size}: a group needs >= 2 samples.")
  topk = kept_topk(config)
  if topk is not None and not 1 <= 2 * topk <= g.group_size:
    raise ValueError(
      f"config.grpo.topk={g.topk}: keeps the top-k and bottom-k of each group, so 2k must be "
      f"in [2, group_size={g.group_size}] (None or 0 keeps all)."
    )
  kept = g.prompts_per_step * (g.group_size if topk is None else 2 * topk)
  rollout = g.prompts_per_step * g.group_size
  if rollout % batch_shards:
    raise ValueError(
      f"prompts_per_step x group_size = {rollout} samples must split over the {batch_shards} "
      "batch shards of the mesh."
    )
  if kept % t.num_minibatches or (kept // t.num_minibatches) % batch_shards:
    raise ValueError(
      f"{kept} kept samples per step do not split into config.train.num_minibatches="
      f"{t.num_minibatches} minibatches of a multiple of {batch_shards} (the batch shards)."
    )


def kept_topk(config: Any) -> int | None:
  """`grpo.topk`, None when every sample is kept (None, or 0: what the command line can set)."""
  return config.grpo.topk or None


def prompt_source(config: Any) -> PromptSource:
  """Training prompts by step and the held-out evaluation prompts of a grpo config."""
  return PromptSource(
    seed=config.seed,
    train_file=config.data.prompts,
    eval_file=config.data.eval_prompts,
    num_eval=config.eval.num_prompts,
    grammar=dict(config.data.synthetic),
    scene_pool=config.data.get("scene_pool", 0),
    pool_phrasings=config.data.get("pool_phrasings", 4),
    num_long_eval=config.eval.get("num_long_prompts", 0),
  )


# --- Jitting ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Phases:
  """The jitted phases of a GRPO step and how to place their host inputs.

  Attributes:
    rollout: (trainable, frozen, prompt_embeds, pooled, key) -> SDETrajectory.
    train: (trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics); donates the
      first two.
    sample: (params, frozen, prompt_embeds, pooled, noise) -> packed latents (ODE, evaluation).
    put: (host array, batch axis) -> the array on the mesh, split over `act_batch` on that axis.
    replicate: host array -> the array on the mesh, replicated.
    take: (array on the mesh, row indices, batch axis) -> those rows, split as `put` splits;
      works on arrays that span processes.
    final: the rollout's latents (S + 1, N, ...) -> the last step's (N, ...), split by rows.
    process_rows: n -> the block of n host rows this process scores (None: one process).
    sigmas / eval_sigmas: the rollout's and the evaluation's schedules.
    timesteps: the trained SDE steps of the first training step.
    window: training step -> its rollout's stochastic steps (start, end) (`steps.sde_window`).
    step_timesteps: training step -> its trained SDE steps (`steps.trained_timesteps`).
    decode_chunk: images decoded per call (the reward batch, a multiple of the batch shards).
    group_size: G, samples per prompt.
  """

  rollout: Callable[..., SDETrajectory]
  train: Callable[..., tuple[Any, Any, dict[str, jax.Array]]]
  sample: Callable[..., jax.Array]
  put: Callable[..., jax.Array]
  replicate: Callable[[Any], jax.Array]
  take: Callable[..., jax.Array]
  final: Callable[[jax.Array], jax.Array]
  process_rows: Callable[[int], slice | None]
  sigmas: jax.Array
  eval_sigmas: jax.Array
  timesteps: tuple[int, ...]
  window: Callable[[int], tuple[int, int]]
  step_timesteps: Callable[[int], tuple[int, ...]]
  decode_chunk: int
  group_size: int


def jit_phases(
  graphdef: Any,
  trainable: Any,
  frozen: Any,
  policy: TextToImage,
  tx: Any,
  config: Any,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
) -> Phases:
  """The rollout, train step and evaluation sampler of `config`, jitted on `mesh` with explicit
  shardings. `trainable` / `frozen` may be abstract (shapes only): nothing is run here."""
  batch_shards = sharding.batch_shard_count(mesh, rules)
  schedule = FlowMatchSchedule()
  seq_len = policy.geo.image_seq_len
  sigmas = jnp.asarray(schedule.sigmas(config.sampling.num_steps, seq_len))
  eval_sigmas = jnp.asarray(schedule.sigmas(config.eval.num_steps, seq_len))
  timesteps = steps_lib.trained_timesteps(config, config.sampling.num_steps)

  def split(ndim: int, axis: int = 0) -> jax.sharding.NamedSharding:
    names = [None] * ndim
    names[axis] = "act_batch"
    return sharding.named_sharding(mesh, tuple(names), rules)

  def put(x: Any, batch_axis: int = 0) -> jax.Array:
    return sharding.place(x, split(np.ndim(x), batch_axis))

  def take(x: jax.Array, rows: Any, batch_axis: int = 0) -> jax.Array:
    return sharding.take(x, rows, batch_axis, split(x.ndim, batch_axis))

  trainable_sh = sharding.state_shardings(trainable, mesh, rules)
  frozen_sh = sharding.state_shardings(frozen, mesh, rules)
  replicated = sharding.named_sharding(mesh, (), rules)
  embeds_sh = (split(3), split(2))  # prompt_embeds (B, T, D), pooled (B, P)
  batch_sh = {
    "latents": split(4, 1),
    "log_probs": split(2, 1),
    "advantages": split(1),
    "mask": split(1),
    "prompt_embeds": embeds_sh[0],
    "pooled": embeds_sh[1],
    "means": split(4, 1),
  }
  batch_sh = {k: batch_sh[k] for k in batch_keys(config)}
  batch_sh["timesteps"] = replicated
  num_steps = config.sampling.num_steps
  first_window = steps_lib.sde_window(config, num_steps, 1)
  # The window is a static argument (one compilation per distinct window; a branching rollout's
  # shapes depend on it), the last, with the first step's window as its default.
  rollout_fn = jax.jit(
    steps_lib.make_rollout(graphdef, policy, sigmas, config, first_window),
    in_shardings=(trainable_sh, frozen_sh, *embeds_sh, replicated),
    static_argnums=(5,),
  )
  train_fn = jax.jit(
    steps_lib.make_train_step(graphdef, tx, policy, sigmas, timesteps, config),
    in_shardings=(trainable_sh, None, frozen_sh, batch_sh),
    out_shardings=(trainable_sh, None, None),
    donate_argnums=(0, 1),
  )
  sample_fn = jax.jit(
    text_to_image.make_ode_sampler(graphdef, policy, eval_sigmas),
    in_shardings=(trainable_sh, frozen_sh, *embeds_sh, split(3)),
  )
  return Phases(
    rollout=rollout_fn,
    train=train_fn,
    sample=sample_fn,
    put=put,
    replicate=lambda x: sharding.place(x, replicated),
    take=take,
    final=jax.jit(lambda latents: latents[-1], out_shardings=split(3)),
    process_rows=lambda n: sharding.process_rows(n, mesh, rules),
    sigmas=sigmas,
    eval_sigmas=eval_sigmas,
    timesteps=timesteps,
    window=lambda step: steps_lib.sde_window(config, num_steps, step),
    step_timesteps=lambda step: steps_lib.trained_timesteps(config, num_steps, step),
    decode_chunk=-(-config.reward.batch_size // batch_shards) * batch_shards,
    group_size=config.grpo.group_size,
  )


# --- The phases of one step ---------------------------------------------------------------------


@dataclasses.dataclass
class Rollout:
  """One step's samples: P prompts x G SDE samples (each prompt's G adjacent)."""

  prompts: list[str]  # (P,)
  group_prompts: list[str]  # (P * G,)
  prompt_embeds: jax.Array  # (P * G, T, D), on the mesh
  pooled: jax.Array  # (P * G, P_dim)
  trajectory: SDETrajectory
  images: np.ndarray  # (P * G, H, W, 3) uint8


@dataclasses.dataclass
class Scored:
  """Every reward of a rollout and the group advantages of the trained one."""

  rewards: dict[str, np.ndarray]  # name -> (P * G,)
  reward: jax.Array  # (P, G): the trained reward (the weighted rewards combined)
  advantages: jax.Array  # (P, G)
  mask: jax.Array  # (P, G) bool: the kept (trained) samples


def rollout(
  phases: Phases,
  policy: TextToImage,
  trainable: Any,
  frozen: Any,
  step_prompts: Sequence[str],
  key: jax.Array,
  step: int = 1,
) -> Rollout:
  """Prompts -> G SDE samples per prompt (no gradients; the stochastic window of training step
  `step`) -> decoded uint8 images (in chunks: a VAE decode of P x G large images at once is
  costly)."""
  G = phases.group_size
  group_prompts = [p for p in step_prompts for _ in range(G)]
  prompt_embeds, pooled = (
    phases.put(jnp.repeat(x, G, axis=0)) for x in policy.encode(list(step_prompts))
  )
  traj = phases.rollout(trainable, frozen, prompt_embeds, pooled, key, phases.window(step))
  images = decode_images(phases, policy, phases.final(traj.latents))
  return Rollout(list(step_prompts), group_prompts, prompt_embeds, pooled, traj, images)


def decode_images(phases: Phases, policy: TextToImage, latents: jax.Array) -> np.ndarray:
  """Packed latents (N, ...) on the mesh -> uint8 images (N, H, W, 3) on the host of every
  process, decoded on the devices in chunks of `phases.decode_chunk` (N a multiple of the
  batch shards)."""
  n, chunk = latents.shape[0], phases.decode_chunk
  return np.concatenate(
    [
      generator_lib.unit_to_uint8(
        policy.decode(phases.take(latents, np.arange(i, min(i + chunk, n)))), policy.source
      )
      for i in range(0, n, chunk)
    ]
  )


def score_images(
  phases: Phases, reward_fns: Mapping[str, Callable], images: np.ndarray, prompts: Sequence[str]
) -> dict[str, np.ndarray]:
  """name -> (N,) float32 of every reward, the same on every process.

  A reward that runs on the devices (`rewards.on_mesh`: SpatialScore) scores every image at once,
  its batch split over the mesh; a host reward (the oracle) scores this process's block of rows
  (`phases.process_rows`), and the blocks are gathered, so that every process holds every reward
  and computes the same group advantages (global statistics included) without exchanging
  images.
  """
  rows = phases.process_rows(len(images))
  local_rows = slice(None) if rows is None else rows
  # Rewards from a service (`submit`: a future) are sent first and collected last, so they
  # score while the host rewards run.
  pending = {
    name: fn.submit(images[local_rows], list(prompts)[local_rows])
    for name, fn in reward_fns.items()
    if hasattr(fn, "submit")
  }
  out = {}
  for name, fn in reward_fns.items():
    if name in pending:
      continue
    if rows is None or rewards_lib.on_mesh(fn):
      out[name] = np.asarray(fn(images, prompts), np.float32)
    else:
      local = np.asarray(fn(images[rows], list(prompts)[rows]), np.float32)
      out[name] = sharding.gather_rows(local, rows, len(images))
  for name, future in pending.items():
    local = np.asarray(future.result(), np.float32)
    out[name] = local if rows is None else sharding.gather_rows(local, rows, len(images))
  return {name: out[name] for name in reward_fns}


def score(phases: Phases, roll: Rollout, reward_fns: Mapping[str, Callable], config: Any) -> Scored:
  """Every reward on the decoded images (`score_images`); the weighted rewards combined
  (`rewards.reward_weights`, `advantages.aggregate_rewards`; one reward is taken as it is) and
  their top-k group advantages."""
  g = config.grpo
  rewards = score_images(phases, reward_fns, roll.images, roll.group_prompts)
  weights = rewards_lib.reward_weights(config)
  grouped = {k: jnp.asarray(rewards[k]).reshape(len(roll.prompts), -1) for k in weights}
  if len(weights) == 1:
    reward = next(iter(grouped.values()))
  else:
    aggregate = config.reward.get("aggregate", "advantage")
    reward = advantages_lib.aggregate_rewards(grouped, weights, aggregate, eps=g.adv_eps)
  advantages, mask = advantages_lib.topk_group_advantages(
    reward, kept_topk(config), stats=g.stats, std=g.std, eps=g.adv_eps, clip=g.adv_clip
  )
  return Scored(rewards, reward, advantages, mask)


def minibatches(
  phases: Phases, roll: Rollout, scored: Scored, config: Any, step: int
) -> list[dict[str, jax.Array]]:
  """The kept samples in `train.num_minibatches` train batches, shuffled by (seed, step) and
  placed on the mesh (`BATCH_AXES` says each entry's sample axis)."""
  kept = np.flatnonzero(np.asarray(scored.mask).reshape(-1))
  order = np.random.default_rng((config.seed, step)).permutation(kept)
  traj, advantages = roll.trajectory, np.asarray(scored.advantages).reshape(-1)
  batches = []
  for idx in np.array_split(order, config.train.num_minibatches):
    # Device arrays are gathered on the devices (they may span processes), host ones placed.
    on_mesh = dict(
      latents=traj.latents,
      log_probs=traj.log_probs,
      prompt_embeds=roll.prompt_embeds,
      pooled=roll.pooled,
      means=traj.means,
    )
    keys = batch_keys(config)
    batch = {k: phases.take(v, idx, BATCH_AXES[k]) for k, v in on_mesh.items() if k in keys}
    batch["advantages"] = phases.put(advantages[idx])
    batch["mask"] = phases.put(np.ones(len(idx), bool))
    batch = {k: batch[k] for k in keys}
    batch["timesteps"] = phases.replicate(np.asarray(phases.step_timesteps(step), np.int32))
    batches.append(batch)
  return batches


def update(
  phases: Phases, trainable: Any, opt_state: Any, frozen: Any, batches: Sequence[dict]
) -> tuple[Any, Any, dict[str, Any]]:
  """One optimizer update per minibatch; returns the new states and the merged metrics."""
  step_metrics = []
  for batch in batches:
    trainable, opt_state, aux = phases.train(trainable, opt_state, frozen, batch)
    step_metrics.append(aux)
  jax.block_until_ready(trainable)
  return trainable, opt_state, merge_minibatch_metrics(jax.device_get(step_metrics))


def merge_minibatch_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The train step's metrics over minibatches: `finite` all, the ratio extremes min / max (as
  the step reduces them over timesteps, `steps.MIN_METRICS` / `MAX_METRICS`), the rest mean."""
  merged = {}
  for k in rows[0]:
    values = np.stack([np.asarray(r[k]) for r in rows])
    if k == "finite":
      merged[k] = bool(values.all())
    elif k in steps_lib.MIN_METRICS:
      merged[k] = values.min()
    elif k in steps_lib.MAX_METRICS:
      merged[k] = values.max()
    else:
      merged[k] = values.mean()
  return merged


def proxy_rises_gold_falls(
  proxy: Sequence[float], gold: Sequence[float], window: int, tolerance: float
) -> bool:
  """The gold-vs-proxy stop rule (`train.early_stop`): over the last `window` steps against the
  `window` before them, the proxy reward's mean rose while the gold reward's fell by more than
  `tolerance`: the policy is being paid for something the ground truth does not reward. False
  with fewer than 2 x `window` values or `window` <= 0."""
  if window <= 0 or min(len(proxy), len(gold)) < 2 * window:
    return False
  proxy, gold = np.asarray(proxy[-2 * window :]), np.asarray(gold[-2 * window :])
  proxy_rose = proxy[window:].mean() > proxy[:window].mean()
  gold_fell = gold[window:].mean() < gold[:window].mean() - tolerance
  return bool(proxy_rose and gold_fell)


def step_scalars(aux: Mapping[str, Any], scored: Scored) -> dict[str, float]:
  """What a step logs: the train metrics, every reward's rollout mean, the kept samples' reward
  statistics, how many groups tie (Flow-GRPO's zero_std_ratio: tied groups teach nothing), and,
  with the oracle among the rewards, how often the trained reward orders a group's samples as
  the oracle does (`advantages.group_pair_agreement`)."""
  scalars = {f"train/{k}": float(v) for k, v in aux.items()}
  scalars["train/kept_fraction"] = float(np.mean(scored.mask))  # Of the rollout.
  scalars.update({f"train/reward_{k}": float(np.mean(v)) for k, v in scored.rewards.items()})
  kept_stats = grpo_lib.reward_metrics(scored.reward.reshape(-1), scored.mask.reshape(-1))
  scalars.update({f"train/{k}": float(v) for k, v in kept_stats.items()})
  group_std = np.asarray(scored.reward).std(axis=1)
  scalars["train/zero_std_ratio"] = float(np.mean(group_std == 0))
  scalars["train/group_reward_std"] = float(np.mean(group_std))
  if "oracle" in scored.rewards:  # Gold vs proxy: the trained reward's ranking, judged.
    gold = np.asarray(scored.rewards["oracle"]).reshape(scored.reward.shape)
    agreement, _ = advantages_lib.group_pair_agreement(scored.reward, gold)
    scalars["train/pair_agreement_with_oracle"] = float(agreement)
  return scalars
