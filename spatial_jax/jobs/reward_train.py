"""Job `reward_train`: SpatialScore with a Bradley-Terry loss on preference pairs.

One linear function, top to bottom: mesh -> data -> model -> split -> optimizer ->
step -> restore -> loop -> final evaluation. The step (`reward/step.py`) is a pure function
of (trainable state, optimizer state, frozen state, batch, step), jitted under the mesh with
the trainable and optimizer state donated; its batches come from `reward/build.py`.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from spatial_jax import checkpoint, configs_lib, metrics, sharding
from spatial_jax.data import loader as pair_loader
from spatial_jax.jobs import data_synthetic
from spatial_jax.reward import build, evaluate, grounding
from spatial_jax.reward.inference import SpatialScore
from spatial_jax.reward.model import trainable_filter
from spatial_jax.reward.step import image_place_spec, make_optimizer, make_train_step


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains, evaluates periodically, checkpoints, and exports; returns the final metrics."""
  configs_lib.check_sizes(
    config,
    {
      "train.steps": 1,
      "train.batch_size": 1,
      "eval.batch_size": 1,
      "eval.max_pairs": 0,
      "eval_every_steps": 0,
      "log_every_steps": 1,
    },
  )
  # -- Mesh ----------------------------------------------------------------------------------
  # Several processes (multi-host): each loads its own slice of the pairs and the global batch
  # is assembled from the slices (`global_pair_inputs`); orbax saves from all of them, process 0
  # alone writes jsons and PNGs. The workdir must be one shared folder (checkpoints).
  if jax.process_index() == 0:  # main.py writes it too; Colab and tests call run() directly.
    os.makedirs(workdir, exist_ok=True)
    metrics.write_config_json(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  key = jax.random.key(config.seed)
  shard_index, shard_count = sharding.process_batch_shard(mesh, rules)
  if config.train.batch_size % shard_count:
    raise ValueError(
      f"config.train.batch_size={config.train.batch_size} pairs must split evenly over the "
      f"{shard_count} processes that hold different slices of the batch."
    )

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
  if not config.data.pairs and config.model.pretrained:
    raise ValueError("config.data.pairs must name a pairs folder when training a real model.")
  pairs_dir = data_synthetic.ensure_pairs(config, workdir)
  train_iter = pair_loader.make_pairs_loader(
    pairs_dir,
    split=config.data.train_split,
    batch_size=config.train.batch_size // shard_count,
    image_size=image_size,
    seed=config.seed,
    shard_index=shard_index,
    shard_count=shard_count,
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

  colour_ids = None
  if config.train.get("grounding_weight", 0.0) > 0:
    colour_ids = jnp.asarray(grounding.colour_token_ids(built.tokenizer))
  train_step = make_train_step(
    graphdef, tx, config, key, colour_ids, image_place_spec(built.model.backbone.config, image_size)
  )
  # Metrics and scores replicated: every process can read them (also when it holds no shard).
  replicated = sharding.named_sharding(mesh, (), rules)
  p_step = jax.jit(
    train_step, donate_argnums=(0, 1), out_shardings=(trainable_sh, None, replicated)
  )

  def score_fn(trainable, frozen, inputs):
    return nnx.merge(graphdef, trainable, frozen)(inputs)

  # Evaluation inputs are host arrays, the same on every process (each reads the whole eval set).
  p_score = jax.jit(score_fn, out_shardings=replicated)

  # -- Checkpoint restore --------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(
    workdir,
    max_to_keep=config.train.keep_checkpoints,
    save_interval_steps=config.train.checkpoint_every,
    max_abs_param=config.train.get("max_abs_param", checkpoint.MAX_ABS_PARAM),
    metadata={
      checkpoint.BASE_MODEL_KEY: config.model.pretrained or "synthetic:" + config.model.preset
    },
  )
  start_step = 0
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(params=trainable, opt_state=opt_state, data_iter=train_iter)
    trainable, opt_state, start_step = restored.params, restored.opt_state, restored.step
    logging.info("Resumed from step %d", start_step)
  elif config.model.get("init_from"):  # Fine-tuning; a resume keeps its own weights.
    init_from_spatial_score(built.model, config.model.init_from, mesh)
    _, trainable, frozen = nnx.split(built.model, trainable_filter(config.model.trainable), ...)

  # -- Train loop ----------------------------------------------------------------------------
  writer = metrics.create_writer(workdir)
  loss_guard = checkpoint.LossGuard(config.train.get("max_loss_ratio", checkpoint.MAX_LOSS_RATIO))
  progress = metrics.Progress(
    config.train.steps,
    every_secs=config.log_every_secs,
    name="train",
    writer=writer,
    start_step=start_step,
  )
  history = metrics.History.load(workdir)
  start_time = time.time()
  step = start_step
  final = None  # The evaluation at the last step, when this run makes it.
  try:
    with sharding.use_mesh(mesh, rules):
      for step in range(start_step + 1, config.train.steps + 1):
        batch = build.global_pair_inputs(built.preparer, next(train_iter), mesh, rules, config)
        trainable, opt_state, aux = p_step(trainable, opt_state, frozen, batch, step)
        log_now = step % config.log_every_steps == 0 or step == config.train.steps
        if log_now or step % config.train.checkpoint_every == 0:
          aux = jax.device_get(aux)
          checkpoint.check_finite(aux, step, ckpt, "reward training", config.log_every_steps)
        if log_now:
          loss_guard.check(aux["loss"], step, ckpt, "reward training")
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
          final = result if step == config.train.steps else None
        ckpt.save(step, params=trainable, opt_state=opt_state, data_iter=train_iter)
        if log_now or final is not None or step % config.eval_every_steps == 0:
          history.save(workdir)
    ckpt.save(step, params=trainable, opt_state=opt_state, data_iter=train_iter, force=True)
  finally:
    # Also on an error: flush the last scalars and finish any in-flight save.
    ckpt.close()
    writer.flush()

  # -- Final evaluation and report -----------------------------------------------------------
  if final is None:  # Resumed at the last step.
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
    history.plot(
      os.path.join(workdir, "learning_curve.png"),
      [("loss", ("train/loss",)), ("pairwise accuracy", ("train/accuracy", "eval/accuracy"))],
      ylim={"pairwise accuracy": (0.0, 1.0)},
    )
    metrics.write_summary(workdir, summary)
  logging.info("Final: %s", final.summary())
  return summary


def init_from_spatial_score(model: nnx.Module, path: str, mesh: jax.sharding.Mesh) -> None:
  """Starts `model` from the weights of a trained SpatialScore (a reward_train workdir or an
  export): fine-tuning, e.g. on pairs of a generator's own images. Every array must match in
  path and shape, so that the source is the same architecture as the config builds."""
  source = SpatialScore.load(path, mesh=mesh)
  ours = dict(nnx.to_flat_state(nnx.state(model)))
  theirs = dict(nnx.to_flat_state(nnx.state(source.model)))
  differ = sorted(
    "/".join(map(str, k))
    for k in ours.keys() | theirs.keys()
    if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape
  )
  if differ:
    raise ValueError(
      f"config.model.init_from={path} is not the architecture this config builds: "
      f"{len(differ)} arrays differ in name or shape (first: {differ[:3]})."
    )
  nnx.update(model, nnx.state(source.model))
  logging.info("Initialised from %s (step %s)", path, source.step)
