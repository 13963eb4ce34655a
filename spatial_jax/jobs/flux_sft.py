"""Job `flux_sft`: flow-matching fine-tuning of the FLUX transformer on (prompt, image) pairs.

One linear function, top to bottom, like `reward_train`: mesh -> data -> model -> split ->
optimizer -> step -> restore -> loop (logs, galleries, checkpoints) -> export. The data are the
chosen images and their prompts of a pairs folder; images go through the codec to latents and
are packed into tokens (x0). The objective and the step are `diffusion/flow_matching.py`'s, the
model and optimizer `diffusion/build.py`'s.

The step is a pure function of (trainable, optimizer state, frozen, batch, key), jitted under
the mesh with the trainable and optimizer state donated; the key is `fold_in(rng, step)`, so a
resumed run draws what an uninterrupted one would. Prompts are encoded outside the step by the
frozen encoders, except T5 with `text.t5_trainable`, which the step runs and trains. With
`train.ema_decay` > 0 the optimizer state also holds an EMA of the trainable weights
(`optim.params_ema`), which galleries and the export use.

Every `gallery.every_steps` (and at the end) held-out prompts of `data.eval_split` are sampled
from fixed noise with the Euler ODE on the FLUX schedule's sigmas; `gallery/step_<N>.png` shows
the samples above the pairs' reference renders, and the oracle's verdict on the samples (the
fraction of the prompts' relations satisfied, of their objects found, and of the relations
with one changed) is logged as `gallery/oracle_*`. (On pure noise every colour is "found", so
`objects` means something only once the samples are clean.)

At the end `<workdir>/final/` holds the generator, for GRPO and for `load_generator`:

  final/generator.json      what the folder holds: codec settings, image size, sampling defaults
  final/transformer/        a diffusers folder (config.json + safetensors of diffusers-named
                            weights, EMA if kept, LoRA merged): `flux.params.from_pretrained`
                            (and diffusers' `FluxTransformer2DModel`) read it
  final/text_encoders/      the synthetic encoders' weights (T5 as trained) + config
  final/lora/               with `trainable="lora"`: the adapter alone, as a diffusers LoRA file
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from spatial_jax import checkpoint, configs_lib, metrics, optim, sharding
from spatial_jax.data import loader as pair_loader
from spatial_jax.data import pairs as pairs_lib
from spatial_jax.diffusion.build import (
  build_codec,
  build_model,
  build_prompt_encoder,
  make_optimizer,
  trainable_filter,
)
from spatial_jax.diffusion.flow_matching import TIMESTEP_SAMPLING, make_train_step, object_weights
from spatial_jax.diffusion.generator import (
  export_generator,
  gallery_grid,
  geometry,
  make_sampler,
  oracle_report,
  oracle_scores,
  unit_to_uint8,
)
from spatial_jax.jobs import data_synthetic

# --- Galleries ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GalleryPrompts:
  prompts: list[str]
  references: np.ndarray  # (n, H, W, 3) uint8: the pairs' chosen renders of the prompts.


def load_gallery_prompts(pairs_dir: str, config: Any) -> GalleryPrompts:
  n = config.gallery.num_prompts
  records = pairs_lib.read_pairs(pairs_dir, split=config.data.eval_split)[:n]
  if n and not records:
    raise ValueError(
      f"{pairs_dir}: no {config.data.eval_split!r} pairs for the gallery "
      "(config.data.eval_split); set config.gallery.num_prompts=0 to skip galleries."
    )
  size = pairs_lib.image_size_hw(config.data.image_size)
  refs = [
    pairs_lib.resize_rgb(pairs_lib.load_rgb(os.path.join(pairs_dir, r.chosen)), size)
    for r in records
  ]
  return GalleryPrompts([r.prompt for r in records], np.stack(refs) if refs else np.zeros(0))


# --- The job --------------------------------------------------------------------------------------


def miscaption(
  batch: dict[str, np.ndarray], fraction: float, seed: Sequence[int], rows: slice | None = None
) -> list[str]:
  """The batch's prompts, each replaced with probability `fraction` by its pair's perturbed
  prompt (one relation changed: a caption that mis-states where its image's objects are).

  Web captions state spatial relations rarely and often wrongly, which is one reason FLUX.1-dev
  follows them only in part; `train.caption_noise` gives the synthetic generator the same
  imperfect supervision, so that it follows relations only in part, leaving the headroom GRPO
  is for. Drawn from (config.seed, step): a resumed run draws the same captions. `rows`: where
  this batch sits in the global batch (a process's block), so any number of processes draws
  what one process draws.
  """
  prompts = [str(p) for p in batch["prompt"]]
  if not fraction:
    return prompts
  perturbed = [str(p) for p in batch["perturbed_prompt"]]
  rows = rows or slice(0, len(prompts))
  draws = np.random.default_rng(list(seed)).random(rows.stop)[rows]
  rows = zip(prompts, perturbed, draws, strict=True)
  return [q if d < fraction and q and q != p else p for p, q, d in rows]


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains, writes galleries and checkpoints, exports `final/`; returns the summary."""
  configs_lib.check_sizes(
    config,
    {
      "train.steps": 1,
      "train.batch_size": 1,
      "gallery.num_prompts": 0,
      "gallery.num_steps": 1,
      "gallery.every_steps": 0,
      "log_every_steps": 1,
    },
  )
  # -- Mesh ----------------------------------------------------------------------------------
  os.makedirs(workdir, exist_ok=True)  # main.py writes config.json; Colab and tests call run().
  metrics.write_config_json(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  if config.train.timestep_sampling not in TIMESTEP_SAMPLING:
    raise ValueError(
      f"config.train.timestep_sampling={config.train.timestep_sampling!r}; use one of "
      f"{TIMESTEP_SAMPLING}."
    )
  batch_shards = sharding.batch_shard_count(mesh, rules)
  if config.train.batch_size % batch_shards:
    raise ValueError(
      f"config.train.batch_size={config.train.batch_size} must be a multiple of the {batch_shards} "
      "shards of the batch axis (act_batch over the mesh)."
    )
  # With several processes each loads and encodes its block of every global batch.
  shard_index, shard_count = sharding.process_batch_shard(mesh, rules)
  local_batch = config.train.batch_size // shard_count
  local_rows = slice(shard_index * local_batch, (shard_index + 1) * local_batch)
  replicated = sharding.named_sharding(mesh, (), rules)

  # -- Frozen components and the model -------------------------------------------------------
  codec = build_codec(config)
  encoder = build_prompt_encoder(config)
  geo = geometry(config.data.image_size, codec, config.text.max_length)
  model = build_model(config, codec, encoder, mesh, rules)
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(config.model.trainable), ...)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  logging.info(
    "FLUX %s: trainable %.3fM, frozen %.3fM parameters; %d image tokens of %d features",
    config.model.trainable,
    count(trainable) / 1e6,
    count(frozen) / 1e6,
    geo.image_seq_len,
    model.config.in_channels,
  )
  trainable_sh = sharding.state_shardings(trainable, mesh, rules)
  # `text.t5_trainable`: T5 trains with the transformer (replicated: it is tiny), so the
  # generator learns to read word order through T5's relative attention, which FLUX's text
  # tokens (all at position 0) lack. The export writes the trained T5 with the generator.
  t5_graphdef = None
  if config.text.get("t5_trainable", False):
    t5_graphdef, t5_params = nnx.split(encoder.encoders.t5)
    # Copies on the mesh (replicated): the step donates them; the encoder keeps its own.
    t5_params = sharding.place(jax.tree.map(jnp.copy, t5_params), replicated)
    trainable = dict(transformer=trainable, t5=t5_params)
    trainable_sh = dict(transformer=trainable_sh, t5=jax.tree.map(lambda _: replicated, t5_params))
    logging.info("T5 trains with the transformer: %.3fM parameters", count(t5_params) / 1e6)

  # -- Data ----------------------------------------------------------------------------------
  pairs_dir = data_synthetic.ensure_pairs(config, workdir)
  train_iter = pair_loader.make_pairs_loader(
    pairs_dir,
    split=config.data.train_split,
    batch_size=local_batch,
    image_size=config.data.image_size,
    seed=config.seed,
    shard_index=shard_index,
    shard_count=shard_count,
  )
  gallery = load_gallery_prompts(pairs_dir, config)

  def device_batch(batch: dict[str, np.ndarray], step: int) -> dict[str, jax.Array]:
    prompts = miscaption(batch, config.train.caption_noise, (config.seed, step), local_rows)
    ids = encoder.tokenize(prompts)
    if t5_graphdef is None:
      prompt_embeds, pooled = encoder.encode_ids(ids["t5_ids"], ids["clip_ids"])
      arrays = dict(images=batch["chosen"], prompt_embeds=prompt_embeds, pooled=pooled)
    else:  # The step encodes the T5 ids with the T5 it trains.
      pooled = encoder.encode_pooled(ids["clip_ids"])
      arrays = dict(images=batch["chosen"], t5_ids=ids["t5_ids"], pooled=pooled)
    if config.train.object_weight != 1.0:
      arrays["weights"] = object_weights(batch["chosen"], config.train.object_weight)
    shardings = {k: sharding.data_sharding(mesh, rules, np.ndim(v)) for k, v in arrays.items()}
    return sharding.process_local_to_global(arrays, shardings)

  # -- Optimizer, step and sampler -----------------------------------------------------------
  tx = make_optimizer(config)
  negative = encoder([""])  # The empty prompt: prompt dropout's and CFG's unconditional branch.
  step_negative = negative
  if t5_graphdef is not None:
    step_negative = (jnp.asarray(encoder.tokenize([""])["t5_ids"]), negative[1])
  with sharding.use_mesh(mesh, rules):
    opt_state = jax.jit(tx.init)(trainable)
  p_step = jax.jit(
    make_train_step(graphdef, tx, config, codec, geo, step_negative, t5_graphdef),
    donate_argnums=(0, 1),
    out_shardings=(trainable_sh, None, None),
  )
  p_sample = jax.jit(
    make_sampler(
      graphdef,
      codec,
      geo,
      num_steps=config.gallery.num_steps,
      guidance=config.gallery.guidance,
      cfg_scale=config.gallery.cfg_scale,
    )
  )

  # -- Checkpoint restore --------------------------------------------------------------------
  # Replicated on the mesh, so that a restored key (placed like its target) meets the mesh's
  # arrays in `fold_in` under the mesh.
  rng = jax.jit(lambda: jax.random.key(config.seed), out_shardings=replicated)()
  ckpt = checkpoint.Checkpointer(
    workdir,
    max_to_keep=config.train.keep_checkpoints,
    save_interval_steps=config.train.checkpoint_every,
    max_abs_param=config.train.get("max_abs_param", checkpoint.MAX_ABS_PARAM),
    metadata={checkpoint.BASE_MODEL_KEY: config.model.transformer or "synthetic:flux_sft"},
  )
  start_step = 0
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(params=trainable, opt_state=opt_state, data_iter=train_iter, rng=rng)
    trainable, opt_state, rng = restored.params, restored.opt_state, restored.rng
    start_step = restored.step
    logging.info("Resumed from step %d", start_step)

  # -- Gallery -------------------------------------------------------------------------------
  writer = metrics.create_writer(workdir)
  gallery_noise = None
  if gallery.prompts:
    shape = (len(gallery.prompts), geo.image_seq_len, model.config.in_channels)
    gallery_noise = jax.random.normal(jax.random.key(config.gallery.seed), shape, jnp.float32)

  def sampling_params():
    """The transformer's weights galleries and the export use (the EMA when one is kept); with
    a trained T5, the encoder takes its weights (the same EMA or not) on the way."""
    ema = optim.ema_params(opt_state)
    params = trainable if ema is None else ema
    if t5_graphdef is None:
      return params
    encoder.set_t5_params(jax.tree.map(jnp.copy, params["t5"]))  # The next step donates them.
    return params["transformer"]

  def write_gallery(step: int) -> dict[str, float]:
    if gallery_noise is None:
      return {}
    params = sampling_params()
    # Placed on the mesh (replicated): local arrays cannot meet other processes' devices.
    inputs = (*encoder(gallery.prompts), gallery_noise, encoder([""]))
    inputs = sharding.place(inputs, replicated)
    with sharding.use_mesh(mesh, rules):
      samples = p_sample(params, frozen, *inputs)
    samples = unit_to_uint8(samples)
    # With grammar prompts, also the same images against each prompt with one relation changed:
    # relations minus that is how far the layouts follow the prompts above chance.
    report = oracle_report(samples, list(gallery.prompts), 1).get("all")
    scores = oracle_scores(samples, gallery.prompts) if report is None else report
    scores = {k: v for k, v in scores.items() if k != "count"}
    metrics.write_images(
      writer,
      step,
      "gallery",
      gallery_grid(samples, gallery.references, config.gallery.ncols),
      png_path=os.path.join(workdir, "gallery", f"step_{step:06d}.png"),
      ncols=max(1, min(config.gallery.ncols, len(samples))),
    )
    scalars = {f"gallery/oracle_{k}": v for k, v in scores.items()}
    writer.write_scalars(step, scalars)
    logging.info("step %d: gallery oracle %s", step, scores)
    return scalars

  # -- Train loop ----------------------------------------------------------------------------

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
  last_gallery: dict[str, float] = {}
  try:
    with sharding.use_mesh(mesh, rules):
      for step in range(start_step + 1, config.train.steps + 1):
        batch = device_batch(next(train_iter), step)
        key = jax.random.fold_in(rng, step)
        trainable, opt_state, aux = p_step(trainable, opt_state, frozen, batch, key)
        log_now = step % config.log_every_steps == 0 or step == config.train.steps
        if log_now or step % config.train.checkpoint_every == 0:
          aux = jax.device_get(aux)
          checkpoint.check_finite(aux, step, ckpt, "flow-matching training", config.log_every_steps)
        if log_now:
          loss_guard.check(aux["loss"], step, ckpt, "flow-matching training")
          scalars = {f"train/{k}": float(v) for k, v in aux.items()}
          writer.write_scalars(step, scalars)
          history.add(step, scalars)
        progress(step)
        every = config.gallery.every_steps
        if (every and step % every == 0) or step == config.train.steps:
          last_gallery = write_gallery(step)
          history.add(step, last_gallery)
        ckpt.save(step, params=trainable, opt_state=opt_state, data_iter=train_iter, rng=rng)
        history.save(workdir)
    ckpt.save(
      step, params=trainable, opt_state=opt_state, data_iter=train_iter, rng=rng, force=True
    )
  finally:
    # Also on an error: flush the last scalars and finish any in-flight save.
    ckpt.close()
    writer.flush()

  # -- Export and report ---------------------------------------------------------------------
  if start_step >= config.train.steps and not last_gallery:
    last_gallery = write_gallery(step)  # Rerun of a finished run: still report its samples.
  final_dir = export_generator(
    os.path.join(workdir, "final"),
    nnx.merge(graphdef, sampling_params(), frozen),
    encoder,
    codec=dict(config.codec),
    image_size=config.data.image_size,
    sampling=dict(
      num_steps=config.gallery.num_steps,
      guidance=config.gallery.guidance,
      cfg_scale=config.gallery.cfg_scale,
    ),
    step=step,
    trained_from=config.model.transformer or "scratch",
  )
  summary = dict(
    step=step,
    train_seconds=round(time.time() - start_time, 1),
    final_loss=history.rows["train/loss"][-1][1] if history.rows.get("train/loss") else None,
    gallery=last_gallery,
    final=final_dir,
  )
  history.save(workdir)
  metrics.write_summary(workdir, summary)
  logging.info("Final: %s", summary)
  return summary
