"""Job `grpo`: GRPO fine-tuning of the FLUX transformer's LoRA with an in-process reward.

One linear function, top to bottom: mesh -> policy (FLUX + LoRA) -> rewards -> prompts ->
optimizer and jitted phases -> restore -> evaluation before training -> the loop -> export.
Each step of the loop:

  prompts (P, from the step number) -> rollout (G SDE samples per prompt, no gradients) ->
  decode -> rewards (every available one; `reward.train_on` drives the advantages) ->
  top-k group advantages (`rl.advantages`) -> training on the kept samples x trained timesteps,
  in `train.num_minibatches` optimizer updates (`rl.steps`) -> metrics, checkpoints.

Every `eval.every_steps` (and before the first and after the last step) the held-out prompts
are sampled deterministically (the ODE, fixed noise) and scored by every reward; the gallery is
written to `gallery/step_<N>.png`. With a scene pool (`data.scene_pool`), the held-out prompts
are the pool's scenes in other words (`eval/`) and fresh scenes (`eval_fresh/`, gallery
`gallery/fresh_step_<N>.png`). Checkpoints hold the LoRA params, the optimizer state and the
rng; the prompts of a step depend on (seed, step) only, so a resumed run continues exactly as an
uninterrupted one. At the end: `final/lora/` (a diffusers LoRA file) and, for a synthetic
generator, `final/` as a generator folder with the LoRA merged (`generator.load_generator`);
`summary.json` holds the evaluation before and after, `curves.png` the reward curve.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from spatial_jax import checkpoint, metrics, sharding
from spatial_jax.data.prompts import PromptSource
from spatial_jax.diffusion import generator as generator_lib
from spatial_jax.diffusion.schedule import FlowMatchSchedule
from spatial_jax.diffusion.sft_job import batch_shard_count, ema_params
from spatial_jax.models.flux import params as flux_params
from spatial_jax.rl import advantages as advantages_lib
from spatial_jax.rl import grpo as grpo_lib
from spatial_jax.rl import policy as policy_lib
from spatial_jax.rl import rewards as rewards_lib
from spatial_jax.rl import steps as steps_lib


def check_config(config: Any, batch_shards: int) -> None:
  """Clear errors for group and batch sizes that cannot work (before anything is built)."""
  g, t = config.grpo, config.train
  if g.group_size < 2:
    raise ValueError(f"config.grpo.group_size={g.group_size}: a group needs >= 2 samples.")
  if g.topk is not None and not 1 <= 2 * g.topk <= g.group_size:
    raise ValueError(
      f"config.grpo.topk={g.topk}: keeps the top-k and bottom-k of each group, so 2k must be "
      f"in [2, group_size={g.group_size}] (None keeps all)."
    )
  kept = g.prompts_per_step * (g.group_size if g.topk is None else 2 * g.topk)
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
  )


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains, evaluates, checkpoints, exports; returns the summary (also in summary.json)."""
  if jax.process_count() > 1:
    # The jitted phases run across processes (rollout and train step: tests/multiprocess_test.py),
    # but this loop decodes, scores and selects the rollout on the host from whole arrays, which
    # several processes would first have to gather (or score their own rows and exchange rewards).
    raise NotImplementedError(
      f"grpo runs in one process (any number of local devices), not {jax.process_count()}: the "
      "loop decodes and rewards the rollout on the host. Use one host with several GPUs/TPU chips "
      "(e.g. srun --nodes=1 --ntasks=1), or call rl.steps' rollout and train step yourself with "
      "batches from sharding.process_local_to_global."
    )
  os.makedirs(workdir, exist_ok=True)
  metrics.write_config_json(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  batch_shards = batch_shard_count(mesh, rules)
  check_config(config, batch_shards)
  g, t = config.grpo, config.train
  P, G = g.prompts_per_step, g.group_size
  # Rollout images decoded per call: the reward batch, rounded up to the batch shards.
  decode_chunk = -(-config.reward.batch_size // batch_shards) * batch_shards

  # -- Policy, rewards, prompts --------------------------------------------------------------
  policy = policy_lib.load_policy(config, mesh, rules)
  graphdef, trainable, frozen = nnx.split(policy.transformer, nnx.LoRAParam, ...)
  logging.info(
    "GRPO policy %s: %.3fM LoRA params on a %.3fM-param transformer",
    policy.source,
    _count(trainable) / 1e6,
    _count(frozen) / 1e6,
  )
  reward_fns = rewards_lib.make_rewards(config, mesh)
  prompts = prompt_source(config)

  # -- Phases --------------------------------------------------------------------------------
  schedule = FlowMatchSchedule()
  sigmas = jnp.asarray(schedule.sigmas(config.sampling.num_steps, policy.geo.image_seq_len))
  eval_sigmas = jnp.asarray(schedule.sigmas(config.eval.num_steps, policy.geo.image_seq_len))
  timesteps = steps_lib.trained_timesteps(config, config.sampling.num_steps)
  tx = steps_lib.make_optimizer(config)
  trainable_sh = sharding.state_shardings(trainable, mesh, rules)
  with sharding.use_mesh(mesh, rules):
    opt_state = jax.jit(tx.init)(trainable)
  p_rollout = jax.jit(steps_lib.make_rollout(graphdef, policy, sigmas, config))
  p_train = jax.jit(
    steps_lib.make_train_step(graphdef, tx, policy, sigmas, timesteps, config),
    donate_argnums=(0, 1),
    out_shardings=(trainable_sh, None, None),
  )
  p_eval = jax.jit(steps_lib.make_eval_sampler(graphdef, policy, eval_sigmas))

  def put(x: Any, batch_axis: int = 0) -> jax.Array:
    names = [None] * np.ndim(x)
    names[batch_axis] = "act_batch"
    return jax.device_put(x, sharding.named_sharding(mesh, tuple(names), rules))

  # -- Restore -------------------------------------------------------------------------------
  rng = jax.device_put(jax.random.key(config.seed), sharding.named_sharding(mesh, (), rules))
  ckpt = checkpoint.Checkpointer(
    workdir,
    max_to_keep=t.keep_checkpoints,
    save_interval_steps=t.checkpoint_every,
    metadata={checkpoint.BASE_MODEL_KEY: policy.source},
  )
  start_step = 0
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(params=trainable, opt_state=opt_state, rng=rng)
    trainable, opt_state, rng = restored.params, restored.opt_state, restored.rng
    start_step = restored.step
    logging.info("Resumed from step %d", start_step)

  # -- Evaluation ----------------------------------------------------------------------------
  writer = metrics.create_writer(workdir)
  # Held-out prompt sets: "eval", and with a scene pool also "eval_fresh" (prompts.PromptSource).
  eval_sets = {"eval": prompts.eval_prompts}
  if prompts.fresh_eval_prompts:
    eval_sets["eval_fresh"] = prompts.fresh_eval_prompts
  eval_inputs = {}
  for prefix, eval_prompts in eval_sets.items():
    # Padded (with copies of the last prompt) to split over the batch shards; trimmed after.
    n = len(eval_prompts)
    rows = np.minimum(np.arange(-(-n // batch_shards) * batch_shards), n - 1)
    embeds = tuple(put(x[rows]) for x in policy.encode(eval_prompts))
    noise = jax.random.normal(
      jax.random.key(config.eval.seed), (len(rows), *policy.latent_shape), jnp.float32
    )
    eval_inputs[prefix] = (embeds, put(noise))

  def sampling_params():
    ema = ema_params(opt_state)
    return trainable if ema is None else ema

  def evaluate(step: int) -> dict[str, float]:
    scores = {}
    for prefix, eval_prompts in eval_sets.items():
      embeds, noise = eval_inputs[prefix]
      with sharding.use_mesh(mesh, rules):
        latents = p_eval(sampling_params(), frozen, *embeds, noise)
        images = generator_lib.unit_to_uint8(policy.decode(latents))[: len(eval_prompts)]
      for name, fn in reward_fns.items():
        scores[f"{prefix}/{name}"] = float(np.mean(fn(images, eval_prompts)))
      if "oracle" in reward_fns:
        report = generator_lib.oracle_report(images, eval_prompts, 1)
        found = report["all"]
        scores[f"{prefix}/oracle_objects"] = found["objects"]
        # Chance level of the layout: the same images against one relation changed.
        scores[f"{prefix}/oracle_perturbed"] = found["relations_perturbed"]
        for length in ("short", "long"):  # One-relation prompts, and 2-4 relations.
          if length in report:
            scores[f"{prefix}/oracle_{length}"] = report[length]["relations"]
            scores[f"{prefix}/oracle_{length}_perturbed"] = report[length]["relations_perturbed"]
      png_name = ("" if prefix == "eval" else prefix.removeprefix("eval_") + "_") + "step"
      metrics.write_images(
        writer,
        step,
        f"{prefix}/gallery",
        images,
        png_path=os.path.join(workdir, "gallery", f"{png_name}_{step:06d}.png"),
        ncols=min(8, len(images)),
      )
    writer.write_scalars(step, scores)
    logging.info("step %d: eval %s", step, scores)
    return scores

  # -- The loop ------------------------------------------------------------------------------
  from spatial_jax.reward.evaluate import History

  history = History.load(workdir)
  before = evaluate(start_step) if start_step == 0 else None
  if before:
    history.add(0, before)
  progress = metrics.Progress(
    t.steps, every_secs=config.log_every_secs, name="grpo", writer=writer, start_step=start_step
  )
  start_time = time.time()
  step = start_step
  last_eval: dict[str, float] = {}
  try:
    with sharding.use_mesh(mesh, rules):
      for step in range(start_step + 1, t.steps + 1):
        key = jax.random.fold_in(rng, step)
        timer = time.perf_counter()
        step_prompts = prompts.train(step, P)
        group_prompts = [p for p in step_prompts for _ in range(G)]  # Each prompt's G adjacent.
        prompt_embeds, pooled = (put(jnp.repeat(x, G, axis=0)) for x in policy.encode(step_prompts))
        traj = p_rollout(trainable, frozen, prompt_embeds, pooled, key)
        images = np.concatenate(  # In chunks: a VAE decode of P x G large images is costly.
          [
            generator_lib.unit_to_uint8(policy.decode(traj.latents[-1][i : i + decode_chunk]))
            for i in range(0, P * G, decode_chunk)
          ]
        )
        rollout_secs, timer = time.perf_counter() - timer, time.perf_counter()

        rewards = {name: fn(images, group_prompts) for name, fn in reward_fns.items()}
        reward = jnp.asarray(rewards[config.reward.train_on]).reshape(P, G)
        advantages, mask = advantages_lib.topk_group_advantages(
          reward, g.topk, stats=g.stats, std=g.std, eps=g.adv_eps, clip=g.adv_clip
        )
        reward_secs, timer = time.perf_counter() - timer, time.perf_counter()

        kept = np.flatnonzero(np.asarray(mask).reshape(-1))
        order = np.random.default_rng((config.seed, step)).permutation(kept)
        step_metrics = []
        for idx in np.array_split(order, t.num_minibatches):
          batch = dict(
            latents=put(traj.latents[:, idx], batch_axis=1),
            log_probs=put(traj.log_probs[:, idx], batch_axis=1),
            advantages=put(np.asarray(advantages).reshape(-1)[idx]),
            mask=put(np.ones(len(idx), bool)),
            prompt_embeds=put(prompt_embeds[idx]),
            pooled=put(pooled[idx]),
          )
          trainable, opt_state, aux = p_train(trainable, opt_state, frozen, batch)
          step_metrics.append(aux)
        jax.block_until_ready(trainable)
        train_secs = time.perf_counter() - timer

        aux = _merge_minibatches(jax.device_get(step_metrics))
        checkpoint.check_finite(aux, step, ckpt, "GRPO training", 1)
        scalars = {f"train/{k}": float(v) for k, v in aux.items()}
        # Of the rollout (each minibatch holds kept samples only).
        scalars["train/kept_fraction"] = float(np.mean(mask))
        scalars.update({f"train/reward_{k}": float(np.mean(v)) for k, v in rewards.items()})
        kept_stats = grpo_lib.reward_metrics(reward.reshape(-1), mask.reshape(-1))
        scalars.update({f"train/{k}": float(v) for k, v in kept_stats.items()})
        # Groups whose rewards all tie teach nothing (Flow-GRPO's zero_std_ratio).
        group_std = np.asarray(reward).std(axis=1)
        scalars["train/zero_std_ratio"] = float(np.mean(group_std == 0))
        scalars["train/group_reward_std"] = float(np.mean(group_std))
        scalars.update(
          {"time/rollout_s": rollout_secs, "time/reward_s": reward_secs, "time/train_s": train_secs}
        )
        writer.write_scalars(step, scalars)
        history.add(step, scalars)
        progress(step)
        if (config.eval.every_steps and step % config.eval.every_steps == 0) or step == t.steps:
          last_eval = evaluate(step)
          history.add(step, last_eval)
        ckpt.save(step, params=trainable, opt_state=opt_state, rng=rng)
        history.save(workdir)
    ckpt.save(step, params=trainable, opt_state=opt_state, rng=rng, force=True)
  finally:
    ckpt.close()
    writer.flush()

  # -- Export and report ---------------------------------------------------------------------
  if not last_eval:
    last_eval = evaluate(step)  # A rerun of a finished run still reports its samples.
  model = nnx.merge(graphdef, sampling_params(), frozen)
  final = os.path.join(workdir, "final")
  if policy.generator is None:
    flux_params.export_lora(model, os.path.join(final, "lora"))
  else:
    generator_lib.export_generator(
      final,
      model,
      policy.generator.prompt_encoder,
      codec=policy.generator.info["codec"],
      image_size=config.data.image_size,
      sampling=dict(
        num_steps=config.eval.num_steps,
        guidance=config.sampling.guidance,
        cfg_scale=config.sampling.cfg_scale,
      ),
      step=step,
      trained_from=policy.source,
    )
  if before is None and history.rows.get(next(iter(last_eval), "")):
    before = {k: history.rows[k][0][1] for k in last_eval if history.rows.get(k)}
  summary = dict(
    step=step,
    train_seconds=round(time.time() - start_time, 1),
    before=before,
    after=last_eval,
    policy=policy.source,
    reward=config.reward.train_on,
    final=final,
  )
  history.save(workdir)
  plot_curves(history, list(reward_fns), os.path.join(workdir, "curves.png"))
  metrics.write_summary(workdir, summary)
  logging.info("Final: %s", summary)
  return summary


def plot_curves(history: Any, reward_names: list[str], path: str) -> None:
  """The training reward (rollout mean) and the evaluation scores against the step, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(reward_names), figsize=(5 * len(reward_names), 3.5))
  for axis, name in zip(np.atleast_1d(axes), reward_names, strict=True):
    for series, style in ((f"train/reward_{name}", "-"), (f"eval/{name}", "o-")):
      if history.rows.get(series):
        steps, values = zip(*history.rows[series], strict=True)
        axis.plot(steps, values, style, label=series)
    axis.set_xlabel("step")
    axis.set_title(name)
    axis.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _merge_minibatches(rows: list[dict[str, Any]]) -> dict[str, Any]:
  merged = {}
  for k in rows[0]:
    values = np.stack([np.asarray(r[k]) for r in rows])
    if k == "finite":
      merged[k] = bool(values.all())
    elif k == "ratio_min":
      merged[k] = values.min()
    elif k == "ratio_max":
      merged[k] = values.max()
    else:
      merged[k] = values.mean()
  return merged


def _count(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
