"""Job `grpo`: GRPO fine-tuning of the FLUX transformer's LoRA with an in-process reward.

One linear function, top to bottom: mesh -> policy (FLUX + LoRA) -> rewards -> prompts ->
optimizer and jitted phases -> restore -> evaluation before training -> the loop -> export.
Each step of the loop:

  prompts (P, from the step number) -> rollout (G SDE samples per prompt, no gradients) ->
  decode -> rewards (every available one; `reward.train_on` drives the advantages) ->
  top-k group advantages (`rl.advantages`) -> training on the kept samples x trained timesteps,
  in `train.num_minibatches` optimizer updates (`rl.steps`) -> metrics, checkpoints; the phases
  are `rl.loop`'s.

Every `eval.every_steps` (and before the first and after the last step) the held-out prompts
are sampled deterministically (the ODE, fixed noise) and scored by every reward; the gallery is
written to `gallery/step_<N>.png`. With a scene pool (`data.scene_pool`), the held-out prompts
are the pool's scenes in other words (`eval/`) and fresh scenes (`eval_fresh/`, gallery
`gallery/fresh_step_<N>.png`). With `eval.num_long_prompts`, held-out full-grammar prompts with
several relations are scored too (`eval_long/`, `gallery/long_step_<N>.png`). Checkpoints hold
the LoRA params, the optimizer state and the rng; the prompts of a step depend on (seed, step)
only, so a resumed run continues exactly as an uninterrupted one. At the end: `final/lora/` (a
diffusers LoRA file) and, for a synthetic generator, `final/` as a generator folder with the
LoRA merged (`generator.load_generator`); `summary.json` holds the evaluation before and after,
`curves.png` the reward curve.

Several processes (`jax.distributed`, e.g. 4 nodes x 8 GPUs or a TPU pod slice) run this same
function on global arrays: the rollout, decoding, SpatialScore and training are split over the
whole mesh; each process scores its block of the rollout with the host rewards (the oracle) and
the rewards are gathered, so every process computes the same group advantages (global
statistics included) and keeps the same samples, exactly as one process would. Groups may span
processes. Checkpoints are written by every process (orbax), the rest (TensorBoard, galleries,
summary, exports) by process 0.
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

from spatial_jax import checkpoint, metrics, optim, sharding
from spatial_jax.diffusion import generator as generator_lib
from spatial_jax.diffusion import text_to_image
from spatial_jax.models.flux import params as flux_params
from spatial_jax.rl import loop
from spatial_jax.rl import rewards as rewards_lib
from spatial_jax.rl import steps as steps_lib


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains, evaluates, checkpoints, exports; returns the summary (also in summary.json)."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  batch_shards = sharding.batch_shard_count(mesh, rules)
  loop.check_config(config, batch_shards)  # Before anything is written.
  os.makedirs(workdir, exist_ok=True)
  metrics.write_config_json(workdir, config)
  t = config.train

  # -- Policy, rewards, prompts --------------------------------------------------------------
  policy = text_to_image.load_text_to_image(config, mesh, rules)
  graphdef, trainable, frozen = nnx.split(policy.transformer, nnx.LoRAParam, ...)
  logging.info(
    "GRPO policy %s: %.3fM LoRA params on a %.3fM-param transformer",
    policy.source,
    _count(trainable) / 1e6,
    _count(frozen) / 1e6,
  )
  reward_fns = rewards_lib.make_rewards(config, mesh)
  rule = config.train.get("early_stop")
  if rule and rule.window and not {rule.proxy, rule.gold} <= set(reward_fns):
    raise ValueError(
      f"config.train.early_stop compares {rule.proxy!r} with {rule.gold!r}, but the rewards of "
      f"this run are {sorted(reward_fns)}."
    )
  prompts = loop.prompt_source(config)

  # -- Phases --------------------------------------------------------------------------------
  tx = steps_lib.make_optimizer(config)
  with sharding.use_mesh(mesh, rules):
    opt_state = jax.jit(tx.init)(trainable)
  phases = loop.jit_phases(graphdef, trainable, frozen, policy, tx, config, mesh, rules)
  put = phases.put

  # -- Restore -------------------------------------------------------------------------------
  # Made on the mesh (replicated): a local key cannot be put on other processes' devices.
  replicated = sharding.named_sharding(mesh, (), rules)
  rng = jax.jit(lambda: jax.random.key(config.seed), out_shardings=replicated)()
  ckpt = checkpoint.Checkpointer(
    workdir,
    max_to_keep=t.keep_checkpoints,
    save_interval_steps=t.checkpoint_every,
    max_abs_param=config.train.get("max_abs_param", checkpoint.MAX_ABS_PARAM),
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
  if prompts.long_eval_prompts:
    eval_sets["eval_long"] = prompts.long_eval_prompts
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
    ema = optim.ema_params(opt_state)
    return trainable if ema is None else ema

  def evaluate(step: int) -> dict[str, float]:
    scores = {}
    for prefix, eval_prompts in eval_sets.items():
      embeds, noise = eval_inputs[prefix]
      with sharding.use_mesh(mesh, rules):
        latents = phases.sample(sampling_params(), frozen, *embeds, noise)
        images = loop.decode_images(phases, policy, latents)[: len(eval_prompts)]
      for name, values in loop.score_images(phases, reward_fns, images, eval_prompts).items():
        scores[f"{prefix}/{name}"] = float(np.mean(values))
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
  history = metrics.History.load(workdir)
  before = evaluate(start_step) if start_step == 0 else None
  if before:
    history.add(0, before)
  progress = metrics.Progress(
    t.steps, every_secs=config.log_every_secs, name="grpo", writer=writer, start_step=start_step
  )
  start_time = time.time()
  step = start_step
  last_eval: dict[str, float] = {}
  stopped_early = ""
  uses_cfg = policy.cfg_scale != 1.0

  # Model evaluations so far: a resumed run starts from the logged steps it keeps.
  nfe_so_far = [sum(v for s, v in history.rows.get("nfe/total", []) if s <= start_step)]

  def evaluations(step: int, kept: int) -> dict[str, float]:
    """Model evaluations of this step (`nfe/`) and since step 1."""
    now = steps_lib.evaluations_per_step(config, config.sampling.num_steps, step, kept, uses_cfg)
    nfe_so_far[0] += now["nfe/total"]
    now["nfe/cumulative"] = nfe_so_far[0]
    return {k: float(v) for k, v in now.items()}

  def early_stop(history: metrics.History) -> str:
    """Why to stop now (`train.early_stop`: the proxy reward rises while the gold one falls on
    the rollouts), or ""."""
    rule = config.train.get("early_stop")
    if not rule or not rule.window:
      return ""
    proxy, gold = (
      [v for _, v in history.rows.get(f"train/reward_{name}", [])]
      for name in (rule.proxy, rule.gold)
    )
    if loop.proxy_rises_gold_falls(proxy, gold, rule.window, rule.tolerance):
      return (
        f"over the last {rule.window} steps the rollouts' {rule.proxy} rose while {rule.gold} "
        f"fell by more than {rule.tolerance} (train.early_stop)"
      )
    return ""

  try:
    with sharding.use_mesh(mesh, rules):
      for step in range(start_step + 1, t.steps + 1):
        key = jax.random.fold_in(rng, step)
        timer = time.perf_counter()
        step_prompts = prompts.train(step, config.grpo.prompts_per_step)
        roll = loop.rollout(phases, policy, trainable, frozen, step_prompts, key, step)
        rollout_secs, timer = time.perf_counter() - timer, time.perf_counter()
        scored = loop.score(phases, roll, reward_fns, config)
        reward_secs, timer = time.perf_counter() - timer, time.perf_counter()
        batches = loop.minibatches(phases, roll, scored, config, step)
        trainable, opt_state, aux = loop.update(phases, trainable, opt_state, frozen, batches)
        train_secs = time.perf_counter() - timer

        checkpoint.check_finite(aux, step, ckpt, "GRPO training", 1)
        scalars = loop.step_scalars(aux, scored)
        scalars.update(
          {"time/rollout_s": rollout_secs, "time/reward_s": reward_secs, "time/train_s": train_secs}
        )
        scalars.update(evaluations(step, int(np.sum(scored.mask))))
        writer.write_scalars(step, scalars)
        history.add(step, scalars)
        progress(step)
        stop = early_stop(history)
        if (config.eval.every_steps and step % config.eval.every_steps == 0) or step == t.steps:
          last_eval = evaluate(step)
          history.add(step, last_eval)
        ckpt.save(step, params=trainable, opt_state=opt_state, rng=rng)
        history.save(workdir)
        if stop:
          logging.warning("Stopping at step %d: %s", step, stop)
          stopped_early, last_eval = stop, {}  # Evaluated below, at this step.
          break
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
        cfg_scale=policy.cfg_scale,  # Resolved: a negative config value means the generator's own.
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
    reward=rewards_lib.reward_weights(config),
    stopped_early=stopped_early,
    final=final,
  )
  history.save(workdir)
  # The training reward (rollout mean) and the evaluation score of every reward.
  panels = [(name, (f"train/reward_{name}", f"eval/{name}")) for name in reward_fns]
  if jax.process_index() == 0:
    history.plot(os.path.join(workdir, "curves.png"), panels)
  metrics.write_summary(workdir, summary)
  logging.info("Final: %s", summary)
  return summary


def _count(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
