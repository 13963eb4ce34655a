"""Job `reward_train`: SpatialScore with a Bradley-Terry loss on preference pairs.

One linear function, top to bottom: mesh -> data -> model -> split -> optimizer ->
step -> restore -> loop -> final evaluation. The step is a pure function of
(trainable state, optimizer state, frozen state, batch, step), jitted under the mesh
with the trainable and optimizer state donated.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx, struct

from spatial_jax import checkpoint, metrics, optim, sharding
from spatial_jax.data import loader as pair_loader
from spatial_jax.data import pairs as pairs_lib
from spatial_jax.models.qwen25vl import ModelInputs, vision
from spatial_jax.reward import build, evaluate, grounding, losses
from spatial_jax.reward.model import trainable_filter


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping, and accumulation."""
  return optim.adamw_warmup_cosine(config.train)


def _pair_rows(batch: dict[str, np.ndarray], perturbed: bool) -> tuple[list, list[str]]:
  """(images, prompts) of the rows, each pair's rows together (see `pair_inputs`)."""
  images, prompts = [], []
  for i, (chosen, rejected) in enumerate(zip(batch["chosen"], batch["rejected"], strict=True)):
    texts = (
      (batch["prompt"][i], batch["perturbed_prompt"][i]) if perturbed else (batch["prompt"][i],)
    )
    for text in texts:
      images += [chosen, rejected]
      prompts += [text, text]
  return images, prompts


def pair_inputs(preparer, batch: dict[str, np.ndarray], *, perturbed: bool = False) -> ModelInputs:
  """One batch of sequences, each pair's rows together: chosen_0, rejected_0, chosen_1, ...

  Pairs together (not all chosen, then all rejected) so that any contiguous block of rows holds
  whole pairs: each process's slice of a global batch is then its own loader batch. With
  `perturbed`, each pair adds its two images under the perturbed prompt, four rows per pair:
  (chosen, prompt), (rejected, prompt), (chosen, perturbed), (rejected, perturbed).
  """
  return preparer(*_pair_rows(batch, perturbed))


@struct.dataclass
class PairBatch:
  """What the train step reads: the sequences and, optionally, colour-grounding targets."""

  inputs: ModelInputs
  centroids: jax.Array | None = None  # (rows, colours, 2): reward.grounding.colour_centroids
  present: jax.Array | None = None  # (rows, colours)
  rows_per_pair: int = struct.field(pytree_node=False, default=2)  # 2, or 4 with `perturbed`


def rows_per_pair(config: Any) -> int:
  """Sequences per pair in a train batch: 2, or 4 with `config.train.perturbed_pairs`."""
  return 4 if config.train.get("perturbed_pairs", False) else 2


def host_pair_batch(preparer, batch: dict[str, np.ndarray], config: Any) -> PairBatch:
  """The loader's pairs -> a host `PairBatch` as `config.train` asks (perturbed, grounding)."""
  rows = rows_per_pair(config)
  perturbed = rows == 4
  images, prompts = _pair_rows(batch, perturbed)
  inputs = preparer(images, prompts)
  centroids = present = None
  if config.train.get("grounding_weight", 0.0) > 0:
    centroids, present = grounding.colour_centroids(np.stack(images))
  return PairBatch(inputs, centroids, present, rows_per_pair=rows)


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


def global_pair_inputs(
  preparer, batch: dict[str, np.ndarray], mesh, rules, config: Any = None
) -> PairBatch | ModelInputs:
  """This process's loader batch -> the sharded global batch of the train step.

  Without `config`, the plain two-rows-per-pair `ModelInputs`; with it, the `PairBatch` that
  `config.train` asks for (`host_pair_batch`). With one process: placed on the mesh. With
  several, each process prepares its own pairs; the global batch is their concatenation in
  `sharding.process_batch_shard` order (`make_array_from_process_local_data`). The vision
  metadata indexes the patches of the whole batch, so it is rebuilt for the global image count
  (every image has the same size: the loader resizes them all).
  """
  host = host_pair_batch(preparer, batch, config) if config is not None else None
  inputs = host.inputs if host else pair_inputs(preparer, batch)
  shardings = input_shardings(inputs, mesh, rules)
  rows = lambda ndim: sharding.named_sharding(  # noqa: E731
    mesh, ("act_batch",) + (None,) * (ndim - 1), rules
  )
  targets = None if host is None else (host.centroids, host.present)
  target_shardings = jax.tree.map(lambda x: rows(np.ndim(x)), targets)
  if jax.process_count() == 1:
    inputs = jax.device_put(inputs, shardings)
    if host is None:
      return inputs
    centroids, present = jax.device_put(targets, target_shardings)
    return PairBatch(inputs, centroids, present, rows_per_pair=host.rows_per_pair)
  _, shards = sharding.process_batch_shard(mesh, rules)
  meta = None
  if inputs.pixel_values is not None:
    grid = np.asarray(preparer.image_processor([batch["chosen"][0]])["image_grid_thw"])
    num_images = inputs.input_ids.shape[0] * shards
    meta = vision.vision_metadata(
      np.tile(grid.reshape(1, 3), (num_images, 1)), preparer.config.vision
    )
  local = dataclasses.replace(inputs, vision_meta=None)
  out = sharding.process_local_to_global(local, dataclasses.replace(shardings, vision_meta=None))
  out = dataclasses.replace(out, vision_meta=jax.device_put(meta, shardings.vision_meta))
  if host is None:
    return out
  centroids, present = sharding.process_local_to_global(targets, target_shardings)
  return PairBatch(out, centroids, present, rows_per_pair=host.rows_per_pair)


def loss_fn(
  model,
  batch: PairBatch | ModelInputs,
  key: jax.Array,
  config: Any,
  colour_ids=None,
  image_places: tuple[int, tuple[int, int]] | None = None,
):
  """The preference loss (+ the colour-grounding auxiliary) of one batch, and its metrics.

  Two rows per pair: the configured loss on (chosen, rejected) under the prompt. Four rows
  (`perturbed_pairs`): also the mirrored pair under the perturbed prompt, where the rejected
  image is the right one, averaged with the first; plus `text_contrast_weight` times the loss
  of each image preferring the prompt it was made for, which holds the image fixed and so
  asks the model to read the changed relation in the text.

  `image_places` = (image token id, merged grid (rows, columns)) adds
  `grounding_image_weight` times `grounding.image_place_loss` (with the grounding loss on).
  """
  if isinstance(batch, ModelInputs):
    batch = PairBatch(batch)
  grounding_on = batch.centroids is not None and colour_ids is not None
  image_weight = config.train.get("grounding_image_weight", 0.0)
  if grounding_on and image_places is not None and image_weight > 0:
    mu, sigma, hidden, embeds = model.forward_with_embeds(batch.inputs)
  else:
    (mu, sigma, hidden), embeds = model.forward(batch.inputs), None
  mu, sigma = mu.reshape(-1, batch.rows_per_pair).T, sigma.reshape(-1, batch.rows_per_pair).T
  pair_loss = losses.get_loss(config.loss)
  keys = jax.random.split(key, 4)

  def prefer(w, lose, k):  # Rows w over rows lose.
    return pair_loss(
      mu[w], sigma[w], mu[lose], sigma[lose], key=keys[k], num_samples=config.mc_samples
    )

  loss = main = prefer(0, 1, 0)
  aux = dict(accuracy=losses.pairwise_accuracy(mu[0], mu[1]), margin=jnp.mean(mu[0] - mu[1]))
  if batch.rows_per_pair == 4:
    text = (prefer(0, 2, 2) + prefer(3, 1, 3)) / 2
    loss = (main + prefer(3, 2, 1)) / 2 + config.train.get("text_contrast_weight", 1.0) * text
    aux["text_contrast_loss"] = text
  aux["preference_loss"] = main
  if grounding_on:
    inputs = batch.inputs
    axis_errors = grounding.centroid_axis_errors(
      model.grounding_head(hidden),
      inputs.input_ids,
      inputs.attention_mask,
      colour_ids,
      batch.centroids,
      batch.present,
    )
    ground = jnp.sum(axis_errors)
    loss = loss + config.train.grounding_weight * ground
    aux.update(grounding_loss=ground, grounding_x=axis_errors[0], grounding_y=axis_errors[1])
    if embeds is not None:
      image_token_id, grid = image_places
      place = grounding.image_place_loss(
        model.grounding_head(embeds), inputs.input_ids, image_token_id, grid
      )
      loss = loss + image_weight * place
      aux["grounding_image_loss"] = place
  aux.update(loss=loss, sigma=jnp.mean(sigma))
  return loss, aux


def image_place_spec(model_config, image_size: int) -> tuple[int, tuple[int, int]]:
  """(image token id, merged grid) of the square `image_size` images a synthetic batch holds."""
  v = model_config.vision
  side = image_size // (v.patch_size * v.spatial_merge_size)
  return model_config.image_token_id, (side, side)


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  config: Any,
  key: jax.Array,
  colour_ids=None,
  image_places: tuple[int, tuple[int, int]] | None = None,
):
  """The pure step: (trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, aux).

  `batch` is a `PairBatch` (or plain two-rows-per-pair `ModelInputs`); `colour_ids`
  (`grounding.colour_token_ids`) enables the grounding loss on batches that carry its targets.

  The loss's random samples use `fold_in(key, step)`, so a resumed run draws exactly what
  an uninterrupted one would. `aux["finite"]` says whether the loss, the gradients and the
  updated parameters are all finite (checked on the host before anything is saved).
  """

  def train_step(trainable, opt_state, frozen, inputs, step):
    step_key = jax.random.fold_in(key, step)

    def objective(trainable):
      model = nnx.merge(graphdef, trainable, frozen)
      return loss_fn(model, inputs, step_key, config, colour_ids, image_places)

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
  synthetic_job.run(data_config, folder)  # Writes from process 0 only.
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("spatial_jax.reward.train:pairs")
    if not os.path.exists(os.path.join(folder, pairs_lib.PAIRS_FILE)):
      raise FileNotFoundError(
        f"Process {jax.process_index()} cannot see the synthetic pairs process 0 wrote to "
        f"{folder}: the workdir must be a folder every process shares (or set config.data.pairs "
        "to a pairs folder each process can read)."
      )
  return folder


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains, evaluates periodically, checkpoints, and exports; returns the final metrics."""
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
  pairs_dir = ensure_pairs(config, workdir)
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
        batch = global_pair_inputs(built.preparer, next(train_iter), mesh, rules, config)
        trainable, opt_state, aux = p_step(trainable, opt_state, frozen, batch, step)
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
