"""Job `reward_train`: SpatialScore with a Bradley-Terry loss on preference pairs.

One linear function, top to bottom: mesh -> data -> model -> split -> optimizer ->
step -> restore -> loop -> final evaluation. The step is a pure function of
(trainable state, optimizer state, frozen state, batch, step), jitted under the mesh
with the trainable and optimizer state donated.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from spatial_jax import checkpoint, metrics, sharding
from spatial_jax.data import loader as pair_loader
from spatial_jax.models.qwen25vl import ModelInputs
from spatial_jax.reward import build, evaluate, losses
from spatial_jax.reward.model import trainable_filter


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping, and accumulation."""
  t = config.train
  # `steps` and `warmup_steps` count micro-batches; the schedule counts optimizer updates.
  k = max(1, t.grad_accum_steps)
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=t.lr,
    warmup_steps=t.warmup_steps // k,
    decay_steps=max(t.steps // k, t.warmup_steps // k + 1),
    end_value=t.lr * t.end_lr_fraction,
  )
  tx = optax.chain(
    optax.clip_by_global_norm(t.grad_clip),
    optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=t.weight_decay),
  )
  if t.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=t.grad_accum_steps)
  return tx


def pair_inputs(preparer, batch: dict[str, np.ndarray]) -> ModelInputs:
  """One batch of 2B sequences: the chosen images first, then the rejected ones, same prompts."""
  images = list(batch["chosen"]) + list(batch["rejected"])
  prompts = list(batch["prompt"]) * 2
  return preparer(images, prompts)


def input_shardings(inputs: ModelInputs, mesh, rules) -> ModelInputs:
  """Sequences (and their image patches) split over `act_batch`; vision indices replicated."""
  batch = lambda ndim, axis=0: sharding.named_sharding(  # noqa: E731
    mesh, tuple("act_batch" if i == axis else None for i in range(ndim)), rules
  )
  replicated = sharding.named_sharding(mesh, (), rules)
  return ModelInputs(
    input_ids=batch(2),
    attention_mask=batch(2),
    position_ids=batch(3, axis=1),
    pixel_values=None if inputs.pixel_values is None else batch(2),
    vision_meta=jax.tree.map(lambda _: replicated, inputs.vision_meta),
  )


def loss_fn(model, inputs: ModelInputs, key: jax.Array, config: Any):
  mu, sigma = model(inputs)
  half = mu.shape[0] // 2
  mu_w, mu_l, sigma_w, sigma_l = mu[:half], mu[half:], sigma[:half], sigma[half:]
  loss = losses.get_loss(config.loss)(
    mu_w, sigma_w, mu_l, sigma_l, key=key, num_samples=config.mc_samples
  )
  aux = dict(
    loss=loss,
    accuracy=losses.pairwise_accuracy(mu_w, mu_l),
    margin=jnp.mean(mu_w - mu_l),
    sigma=jnp.mean(sigma),
  )
  return loss, aux


def make_train_step(graphdef, tx: optax.GradientTransformation, config: Any, key: jax.Array):
  """The pure step: (trainable, opt_state, frozen, inputs, step) -> (trainable, opt_state, aux).

  The loss's random samples use `fold_in(key, step)`, so a resumed run draws exactly what
  an uninterrupted one would. `aux["finite"]` says whether the loss, the gradients and the
  updated parameters are all finite (checked on the host before anything is saved).
  """

  def train_step(trainable, opt_state, frozen, inputs, step):
    step_key = jax.random.fold_in(key, step)

    def objective(trainable):
      model = nnx.merge(graphdef, trainable, frozen)
      return loss_fn(model, inputs, step_key, config)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    aux["grad_norm"] = optax.tree.norm(grads)
    aux["finite"] = (
      jnp.isfinite(loss) & jnp.isfinite(aux["grad_norm"]) & jnp.isfinite(optax.tree.norm(trainable))
    )
    return trainable, opt_state, aux

  return train_step


def ensure_pairs(config: Any, workdir: str) -> str:
  """`config.data.pairs`, or (when empty) synthetic pairs built once into `<workdir>/pairs`."""
  if config.data.pairs:
    return config.data.pairs
  if config.model.pretrained:
    raise ValueError("config.data.pairs must name a pairs folder when training a real model.")
  import ml_collections

  from spatial_jax.data import synthetic_job

  folder = os.path.join(workdir, "pairs")
  data_config = ml_collections.ConfigDict(dict(config.data.synthetic))
  data_config.seed = config.seed
  synthetic_job.run(data_config, folder)
  return folder


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains, evaluates periodically, checkpoints, and exports; returns the final metrics."""
  # -- Mesh ----------------------------------------------------------------------------------
  if jax.process_count() > 1:
    # Each process would need its own slice of the batch, with chosen/rejected rows of a pair
    # kept together (make_array_from_process_local_data); until then, refuse clearly.
    raise NotImplementedError("reward_train runs in one process (any number of local devices).")
  if jax.process_index() == 0:  # main.py writes it too; Colab and tests call run() directly.
    os.makedirs(workdir, exist_ok=True)
    metrics.write_config_json(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  key = jax.random.key(config.seed)

  # -- Model ---------------------------------------------------------------------------------
  built = build.build(config, workdir, mesh, rules)
  graphdef, trainable, frozen = nnx.split(
    built.model, trainable_filter(config.model.trainable), ...
  )
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  logging.info(
    "Trainable %.3fM, frozen %.3fM parameters", count(trainable) / 1e6, count(frozen) / 1e6
  )
  trainable_sh = sharding.state_shardings(trainable, mesh, rules)

  # -- Data ----------------------------------------------------------------------------------
  image_size = config.data.image_size
  pairs_dir = ensure_pairs(config, workdir)
  train_iter = pair_loader.make_pairs_loader(
    pairs_dir,
    split=config.data.train_split,
    batch_size=config.train.batch_size // jax.process_count(),
    image_size=image_size,
    seed=config.seed,
  )
  test_records = evaluate.load_eval_pairs(
    pairs_dir,
    config.data.eval_split,
    max_pairs=config.eval.max_pairs,
    image_size=image_size,
  )

  # -- Optimizer and step --------------------------------------------------------------------
  tx = make_optimizer(config)
  with sharding.use_mesh(mesh, rules):
    opt_state = jax.jit(tx.init)(trainable)

  train_step = make_train_step(graphdef, tx, config, key)
  p_step = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(trainable_sh, None, None))

  def score_fn(trainable, frozen, inputs):
    return nnx.merge(graphdef, trainable, frozen)(inputs)

  p_score = jax.jit(score_fn)

  # -- Checkpoint restore --------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(
    workdir,
    max_to_keep=config.train.keep_checkpoints,
    save_interval_steps=config.train.checkpoint_every,
    metadata={
      checkpoint.BASE_MODEL_KEY: config.model.pretrained or "synthetic:" + config.model.preset
    },
  )
  start_step = 0
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(params=trainable, opt_state=opt_state, data_iter=train_iter)
    trainable, opt_state, start_step = restored.params, restored.opt_state, restored.step
    logging.info("Resumed from step %d", start_step)

  # -- Train loop ----------------------------------------------------------------------------
  writer = metrics.create_writer(workdir)
  progress = metrics.Progress(
    config.train.steps,
    every_secs=config.log_every_secs,
    name="train",
    writer=writer,
    start_step=start_step,
  )
  history = evaluate.History.load(workdir)
  start_time = time.time()
  step = start_step
  try:
    with sharding.use_mesh(mesh, rules):
      for step in range(start_step + 1, config.train.steps + 1):
        batch = next(train_iter)
        inputs = pair_inputs(built.preparer, batch)
        inputs = jax.device_put(inputs, input_shardings(inputs, mesh, rules))
        trainable, opt_state, aux = p_step(trainable, opt_state, frozen, inputs, step)
        log_now = step % config.log_every_steps == 0 or step == config.train.steps
        if log_now or step % config.train.checkpoint_every == 0:
          aux = jax.device_get(aux)
          checkpoint.check_finite(aux, step, ckpt, "reward training", config.log_every_steps)
        if log_now:
          scalars = {f"train/{k}": float(v) for k, v in aux.items() if k != "finite"}
          writer.write_scalars(step, scalars)
          history.add(step, scalars)
        progress(step)
        if step % config.eval_every_steps == 0 or step == config.train.steps:
          result = evaluate.evaluate(
            functools.partial(p_score, trainable, frozen), built.preparer, test_records, config
          )
          writer.write_scalars(step, {f"eval/{k}": v for k, v in result.scalars().items()})
          history.add(step, {f"eval/{k}": v for k, v in result.scalars().items()})
          logging.info("step %d: eval %s", step, result.summary())
        ckpt.save(step, params=trainable, opt_state=opt_state, data_iter=train_iter)
        history.save(workdir)
    ckpt.save(step, params=trainable, opt_state=opt_state, data_iter=train_iter, force=True)
  finally:
    # Also on an error: flush the last scalars and finish any in-flight save.
    ckpt.close()
    writer.flush()

  # -- Final evaluation and report -----------------------------------------------------------
  final = evaluate.evaluate(
    functools.partial(p_score, trainable, frozen), built.preparer, test_records, config
  )
  summary = dict(
    step=step,
    train_seconds=round(time.time() - start_time, 1),
    eval=final.as_dict(),
  )
  if jax.process_index() == 0:
    history.save(workdir)
    history.plot(os.path.join(workdir, "learning_curve.png"))
    metrics.write_summary(workdir, summary)
  logging.info("Final: %s", final.summary())
  return summary
