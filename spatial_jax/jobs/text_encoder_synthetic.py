"""Job `text_encoder_synthetic`: pretrains the synthetic world's tiny T5 encoder on the grammar.

The synthetic stand-in for T5-XXL's language pretraining (see `text_pretrain` for the objective):
a parse head asks each colour word for its object's layout targets (and, with the fixed
readout, its colour), and (with
`train.mlm_weight` > 0) a masked-token head trains the other words' states. One linear
function, like `flux_sft`: mesh -> model -> split -> optimizer -> step -> restore -> loop (logs,
held-out evaluation, checkpoints) -> probe -> export. Batches are drawn on the host as a function of (seed, step), so a resumed run
sees exactly the prompts an uninterrupted one would; the held-out prompts come from
`config.data.eval_seed`.

The summary (`summary.json`, and `probe/*` scalars) reports a linear ridge probe of the sign of
each object's x and y target, fit on the frozen final features at colour tokens of one half of
the held-out prompts and scored on the other half, and a nearest-class-mean probe of the colour
the token names, for the trained encoder AND for the random frozen T5 that flux_sft uses without
pretraining (`synthetic.build_prompt_encoder(seed=1234)`), plus the parse head's own held-out
sign accuracy.

`<workdir>/final/` is a transformers T5 encoder folder (config.json, model.safetensors with
transformers' key names, the synthetic tokenizer with `model_max_length`), written into a
temporary folder and renamed into place. Set flux_sft's `config.text.t5_pretrained` to it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from spatial_jax import checkpoint, fileio, metrics, sharding
from spatial_jax.data import tokenizer as tokenizer_lib
from spatial_jax.diffusion import synthetic, text_pretrain
from spatial_jax.models.t5 import params as t5_params

# config.json's special token ids (transformers' T5 defaults, 0 and 1, are not this tokenizer's).
_ID_TOKENS = (("pad_token_id", tokenizer_lib.PAD), ("eos_token_id", tokenizer_lib.EOS))


def check_config(config: Any, batch_shards: int) -> None:
  """Raises ValueError naming the first bad `config` field (before any work is done)."""
  t, d = config.train, config.data
  if t.mlm_weight < 0:
    raise ValueError(f"config.train.mlm_weight={t.mlm_weight} must be >= 0 (0 turns it off).")
  if not 0 <= t.mlm_rate < 1 or (t.mlm_weight > 0 and t.mlm_rate == 0):
    raise ValueError(
      f"config.train.mlm_rate={t.mlm_rate} must be in (0, 1) while mlm_weight > 0 "
      "(the fraction of tokens replaced)."
    )
  for name, size in (("train.batch_size", t.batch_size), ("data.num_eval", d.num_eval)):
    if size < 2 or size % batch_shards:
      raise ValueError(
        f"config.{name}={size} must be >= 2 and a multiple of the {batch_shards} shards of the "
        "batch axis (act_batch over the mesh)."
      )
  if d.eval_seed == config.seed:
    raise ValueError(
      f"config.data.eval_seed={d.eval_seed} equals config.seed: the held-out prompts must come "
      "from another stream than the training prompts."
    )
  vocab_size = len(tokenizer_lib.vocabulary())
  if config.model.t5.get("vocab_size", vocab_size) != vocab_size:
    raise ValueError(
      f"config.model.t5.vocab_size={config.model.t5.vocab_size}, but the synthetic tokenizer has "
      f"{vocab_size} tokens; leave vocab_size out."
    )


def evaluate(eval_fn, params, rest, batch, ridge: float) -> tuple[dict[str, float], dict]:
  """Held-out losses / parse sign accuracy, and the probe on the trained features."""
  aux = jax.tree.map(sharding.to_host, eval_fn(params, rest, batch))  # Gathered across processes.
  features = np.asarray(aux.pop("features"), np.float32)
  aux.pop("predicted")
  scalars = {k: float(v) for k, v in aux.items()}
  host = {k: sharding.to_host(batch[k]) for k in ("targets", "target_mask", "colour")}
  probe = text_pretrain.probe_accuracy(
    features, host["targets"], host["target_mask"], ridge=ridge, colour=host["colour"]
  )
  return scalars, probe


def random_baseline(config: Any, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """The probe on the random frozen T5 flux_sft uses without a pretrained one."""
  encoder = synthetic.build_prompt_encoder(
    seed=config.probe.random_seed, max_length=config.data.max_length, t5=dict(config.model.t5)
  ).encoders.t5
  graphdef, state = nnx.split(encoder)
  features = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, batch["ids"])
  return text_pretrain.probe_accuracy(
    np.asarray(features, np.float32),
    batch["targets"],
    batch["target_mask"],
    ridge=config.probe.ridge,
    colour=batch["colour"],
  )


def export(directory: str, encoder, max_length: int) -> str:
  """Writes the encoder as a transformers T5 folder with the tokenizer, all or nothing. Every
  process calls it (sharded weights are gathered); process 0 writes."""
  if jax.process_index() != 0:
    t5_params.save_pretrained(encoder, directory)  # Takes part in the gather; writes nothing.
    return directory
  with fileio.atomic_directory(directory) as tmp:
    ids = {name: tokenizer_lib.vocabulary().index(token) for name, token in _ID_TOKENS}
    t5_params.save_pretrained(encoder, tmp, **ids)
    tokenizer_lib.save_tokenizer(tmp, model_max_length=max_length)
  logging.info("Wrote the pretrained T5 encoder to %s", directory)
  return directory


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains, evaluates, checkpoints, probes and exports `final/`; returns the summary."""
  # -- Mesh and checks -----------------------------------------------------------------------
  # Several processes: every one builds the same host batches (prompts drawn from (seed, step))
  # and places them on the global mesh; process 0 writes.
  os.makedirs(workdir, exist_ok=True)  # main.py writes config.json; Colab and tests call run().
  metrics.write_config_json(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  batch_shards = int(np.prod([mesh.shape[a] for a in _batch_axes(rules)]))
  check_config(config, batch_shards)
  t = config.train
  mlm_rate = t.mlm_rate if t.mlm_weight > 0 else 0.0

  # -- Model, optimizer, step ----------------------------------------------------------------
  t5_config = synthetic.t5_config(**config.model.t5)
  model = sharding.create_sharded(
    lambda: text_pretrain.Pretrainer(
      t5_config,
      position_bias_std=config.model.position_bias_std,
      parse_readout=config.model.get("parse_readout", "linear"),
      parse_scale=config.model.get("parse_scale", 1.0),
      rngs=nnx.Rngs(config.seed),
    ),
    mesh,
    rules,
  )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model.encoder)))
  logging.info("T5 encoder %.3fM parameters (%s)", count / 1e6, t5_config)
  params_sh = sharding.state_shardings(params, mesh, rules)
  tx = text_pretrain.make_optimizer(t)
  with sharding.use_mesh(mesh, rules):
    opt_state = jax.jit(tx.init)(params)
  p_step = jax.jit(
    text_pretrain.make_train_step(graphdef, tx, t.mlm_weight),
    donate_argnums=(0, 1),
    out_shardings=(params_sh, None, None),
  )

  def eval_step(params, rest, batch):
    _, aux = text_pretrain.loss_fn(nnx.merge(graphdef, params, rest), batch, t.mlm_weight)
    return aux

  p_eval = jax.jit(eval_step)

  # -- Data ----------------------------------------------------------------------------------
  tokenizer = tokenizer_lib.build_tokenizer()

  def host_batch(seed: int, step: int, size: int) -> dict[str, np.ndarray]:
    return text_pretrain.make_batch(
      seed, step, size, config.data, mlm_rate=mlm_rate, tokenizer=tokenizer
    )

  def device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {
      k: jax.device_put(v, sharding.data_sharding(mesh, rules, v.ndim)) for k, v in batch.items()
    }

  held_out = host_batch(config.data.eval_seed, 0, config.data.num_eval)
  held_out_device = device_batch(held_out)

  # -- Checkpoint restore --------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(
    workdir,
    max_to_keep=t.keep_checkpoints,
    save_interval_steps=t.checkpoint_every,
    max_abs_param=config.train.get("max_abs_param", checkpoint.MAX_ABS_PARAM),
    metadata={checkpoint.BASE_MODEL_KEY: "scratch:text_encoder_synthetic"},
  )
  start_step = 0
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(params=params, opt_state=opt_state)
    params, opt_state, start_step = restored.params, restored.opt_state, restored.step
    logging.info("Resumed from step %d", start_step)

  # -- Train loop ----------------------------------------------------------------------------

  writer = metrics.create_writer(workdir)
  loss_guard = checkpoint.LossGuard(config.train.get("max_loss_ratio", checkpoint.MAX_LOSS_RATIO))
  progress = metrics.Progress(
    t.steps, every_secs=config.log_every_secs, name="train", writer=writer, start_step=start_step
  )
  history = metrics.History.load(workdir)

  def write_eval(step: int) -> tuple[dict[str, float], dict[str, Any]]:
    with sharding.use_mesh(mesh, rules):
      scalars, probe = evaluate(p_eval, params, rest, held_out_device, config.probe.ridge)
    row = {f"eval/{k}": v for k, v in scalars.items()}
    row.update({f"eval/probe_{a}": probe[a] for a in (*text_pretrain.AXES, "mean", "colour")})
    writer.write_scalars(step, row)
    history.add(step, row)
    logging.info("step %d: held-out %s, probe %s", step, scalars, probe)
    return scalars, probe

  start_time = time.time()
  step = start_step
  try:
    with sharding.use_mesh(mesh, rules):
      for step in range(start_step + 1, t.steps + 1):
        batch = device_batch(host_batch(config.seed, step, t.batch_size))
        params, opt_state, aux = p_step(params, opt_state, rest, batch)
        log_now = step % config.log_every_steps == 0 or step == t.steps
        if log_now or step % t.checkpoint_every == 0:
          aux = jax.device_get(aux)
          checkpoint.check_finite(aux, step, ckpt, "text encoder training", config.log_every_steps)
        if log_now:
          loss_guard.check(aux["loss"], step, ckpt, "text encoder training")
          scalars = {f"train/{k}": float(v) for k, v in aux.items()}
          writer.write_scalars(step, scalars)
          history.add(step, scalars)
        progress(step)
        every = config.eval_every_steps
        if every and step % every == 0 and step != t.steps:
          write_eval(step)
        ckpt.save(step, params=params, opt_state=opt_state)
        history.save(workdir)
    ckpt.save(step, params=params, opt_state=opt_state, force=True)
  finally:
    # Also on an error: flush the last scalars and finish any in-flight save.
    ckpt.close()
    writer.flush()
  train_seconds = round(time.time() - start_time, 1)

  # -- Probe, export and report --------------------------------------------------------------
  scalars, probe = write_eval(step)
  baseline = random_baseline(config, held_out)
  axes = (*text_pretrain.AXES, "mean", "colour")
  probe_scalars = {f"probe/pretrained_{a}": probe[a] for a in axes}
  writer.write_scalars(step, {**probe_scalars, **{f"probe/random_{a}": baseline[a] for a in axes}})
  writer.flush()
  final_dir = export(
    os.path.join(workdir, "final"),
    nnx.merge(graphdef, params, rest).encoder,
    config.data.max_length,
  )
  summary = dict(
    step=step,
    train_seconds=train_seconds,
    final_loss=history.rows["train/loss"][-1][1] if history.rows.get("train/loss") else None,
    held_out=scalars,
    parse_sign_accuracy=scalars["parse_sign_accuracy"],
    probe=dict(pretrained=probe, random=baseline),
    num_eval=config.data.num_eval,
    final=final_dir,
  )
  history.save(workdir)
  metrics.write_summary(workdir, summary)
  logging.info("Final: %s", summary)
  return summary


def _batch_axes(rules: sharding.Rules) -> tuple[str, ...]:
  spec = sharding.logical_to_spec(("act_batch",), rules)[0]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
