"""Job `sample`: images for a list of prompts from a base model and an optional LoRA.

The model is a diffusers FLUX folder (`model.pipeline`) or a synthetic generator folder
(`model.generator`: a `flux_sft` or `grpo` export); `model.lora` adds a diffusers LoRA file
(e.g. `<grpo workdir>/final/lora`). Prompts come from `prompts` (a text or jsonl file), or, when
empty, the synthetic grammar's held-out prompts (the ones `grpo` evaluates on with the same seed).
Samples are deterministic: the Euler ODE from noise drawn from (seed, prompt index, image index).

Writes into the workdir:

  images/<prompt>_<image>.png   every sample
  grid.png                      the first `grid_prompts` prompts, one row each
  samples.jsonl                 per prompt: the prompt, its files, and the oracle's verdicts
  metrics.json                  in the synthetic world: the oracle's spatial accuracy (relations
                                satisfied) and objects found, overall and for short (one
                                relation) and long prompts, with two controls: the same images
                                against other prompts (`*_control`) and against their prompts
                                with one relation changed (`relations_perturbed`: chance level
                                for a generator that draws the objects at random places)
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from spatial_jax import configs_lib, fileio, metrics, sharding
from spatial_jax.data.prompts import PromptSource
from spatial_jax.diffusion import generator as generator_lib
from spatial_jax.diffusion import text_to_image
from spatial_jax.diffusion.schedule import FlowMatchSchedule
from spatial_jax.models.flux import params as flux_params


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Samples every prompt, writes the files above; returns the metrics."""
  configs_lib.check_sizes(
    config,
    {
      "num_prompts": 1,
      "images_per_prompt": 1,
      "batch_size": 1,
      "grid_prompts": 0,
      "sampling.num_steps": 1,
    },
  )
  os.makedirs(workdir, exist_ok=True)
  metrics.write_config_json(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  policy = text_to_image.load_text_to_image(config, mesh, rules, add_lora=False)
  if config.model.lora:
    with sharding.use_mesh(mesh, rules):
      flux_params.load_lora(policy.transformer, config.model.lora)
  graphdef, state = nnx.split(policy.transformer)
  prompts = PromptSource(
    seed=config.seed,
    eval_file=config.prompts,
    num_eval=config.num_prompts,
    grammar=dict(config.data.synthetic),
  ).eval_prompts
  n = config.images_per_prompt
  sigmas = FlowMatchSchedule().sigmas(config.sampling.num_steps, policy.geo.image_seq_len)
  sample = jax.jit(text_to_image.make_ode_sampler(graphdef, policy, jnp.asarray(sigmas)))
  logging.info("Sampling %d prompts x %d images (%s)", len(prompts), n, policy.source)

  start = time.time()
  # Prompts per call: the batch (chunk x n images) splits over the mesh's batch shards, across
  # processes too; every process places the same host inputs and gets every image back.
  shards = sharding.batch_shard_count(mesh, rules)
  chunk = max(1, config.batch_size // n)
  while (chunk * n) % shards:
    chunk += 1
  split = lambda x: sharding.place(x, sharding.data_sharding(mesh, rules, np.ndim(x)))  # noqa: E731
  images = []
  with sharding.use_mesh(mesh, rules):
    for first in range(0, len(prompts), chunk):
      group = prompts[first : first + chunk]
      real = len(group) * n
      # The last chunk is padded with copies of its last prompt: one compiled program.
      group = group + group[-1:] * (chunk - len(group))
      embeds, pooled = (split(jnp.repeat(x, n, axis=0)) for x in policy.encode(group))
      keys = [
        jax.random.fold_in(jax.random.key(config.seed), (first + i) * n + j)
        for i in range(len(group))
        for j in range(n)
      ]
      noise = jnp.stack([jax.random.normal(k, policy.latent_shape, jnp.float32) for k in keys])
      latents = sample(state, nnx.State({}), embeds, pooled, split(noise))
      images.append(generator_lib.unit_to_uint8(policy.decode(latents), policy.source)[:real])
  images = np.concatenate(images)
  seconds = time.time() - start

  from PIL import Image

  # Each process writes the PNGs of its block of prompts; process 0 the rest (one folder).
  mine = sharding.process_rows(len(prompts), mesh, rules) or slice(0, len(prompts))
  rows = []
  for i, prompt in enumerate(prompts):
    files = [os.path.join("images", f"{i:05d}_{j}.png") for j in range(n)]
    for j, name in enumerate(files):
      if mine.start <= i < mine.stop:
        buf = io.BytesIO()
        Image.fromarray(images[i * n + j]).save(buf, format="PNG")
        fileio.write_atomic(os.path.join(workdir, name), buf.getvalue())
    rows.append(dict(prompt=prompt, files=files))
  if jax.process_count() > 1:  # Every image is on disk before the summary says it is done.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("spatial_jax.jobs.sample:images")
  report = generator_lib.oracle_report(images, prompts, n)
  if report:
    from spatial_jax.data import oracle

    for i, row in enumerate(rows):
      row["oracle"] = [
        oracle.score_prompt(images[i * n + j], row["prompt"]).fraction for j in range(n)
      ]
  grid_rows = min(len(prompts), config.grid_prompts)
  metrics.write_images(
    None, 0, "grid", images[: grid_rows * n], png_path=os.path.join(workdir, "grid.png"), ncols=n
  )
  if jax.process_index() == 0:
    fileio.write_atomic(
      os.path.join(workdir, "samples.jsonl"),
      "".join(json.dumps(r) + "\n" for r in rows).encode(),
    )
  summary = dict(
    model=policy.source,
    lora=config.model.lora or None,
    prompts=len(prompts),
    images_per_prompt=n,
    num_steps=config.sampling.num_steps,
    cfg_scale=policy.cfg_scale,
    sampling_seconds=round(seconds, 1),
    oracle=report or None,
  )
  metrics.write_summary(workdir, summary, name="metrics.json")
  logging.info("Wrote %d images to %s: %s", len(images), workdir, report.get("all"))
  return summary
