"""Job `flux_sft`: flow-matching fine-tuning of the FLUX transformer on (prompt, image) pairs.

One linear function, top to bottom, like `reward_train`: mesh -> data -> model -> split ->
optimizer -> step -> restore -> loop (logs, galleries, checkpoints) -> export. The data are the
chosen images and their prompts of a pairs folder; images go through the codec to latents and
are packed into tokens (x0). Per example, t is drawn by `config.train.timestep_sampling`
(`logit_normal`: SD3's sigmoid of N(mean, std); or `uniform`), optionally shifted by the
schedule's resolution-dependent mu as the sampler's sigmas are; with noise ~ N(0, 1),

  x_t = (1 - t) x0 + t noise,   target = noise - x0,   loss = mean((v(x_t, t) - target)^2),

the rectified-flow objective whose velocity the Euler sampler integrates from t = 1 to 0.

The step is a pure function of (trainable, optimizer state, frozen, batch, key), jitted under
the mesh with the trainable and optimizer state donated; the key is `fold_in(rng, step)`, so a
resumed run draws what an uninterrupted one would. Prompts are encoded outside the step by the
frozen encoders, except T5 with `text.t5_trainable`, which the step runs and trains. With `train.ema_decay` > 0 the optimizer state
also holds an EMA of the trainable weights (`params_ema`), which galleries and the export use.

Every `gallery.every_steps` (and at the end) held-out prompts of `data.eval_split` are sampled
from fixed noise with the Euler ODE on the FLUX schedule's sigmas; `gallery/step_<N>.png` shows
the samples above the pairs' reference renders, and the oracle's verdict on the samples (the
fraction of the prompts' relations satisfied, of their objects found) is logged as
`gallery/oracle_*`. (On pure noise every colour is "found", so `objects` means something only
once the samples are clean.)

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
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from spatial_jax import checkpoint, lora, metrics, sharding
from spatial_jax.data import loader as pair_loader
from spatial_jax.data import oracle
from spatial_jax.data import pairs as pairs_lib
from spatial_jax.diffusion import synthetic
from spatial_jax.diffusion.generator import (
  Embeds,
  Geometry,
  export_generator,
  gallery_grid,
  geometry,
  images_to_unit,
  make_sampler,
  oracle_scores,
  unit_to_uint8,
  velocity_fn,
)
from spatial_jax.diffusion.latents import pack
from spatial_jax.diffusion.schedule import FlowMatchSchedule
from spatial_jax.models.flux import FluxConfig, FluxTransformer, layers
from spatial_jax.models.flux import params as flux_params

TIMESTEP_SAMPLING = ("logit_normal", "uniform")
TRAINABLE = ("all", "lora")
_TOKENS = ("act_batch", None, None)


# --- The objective -------------------------------------------------------------------------------


def sample_timesteps(key: jax.Array, batch: int, config: Any, image_seq_len: int) -> jax.Array:
  """(batch,) fp32 flow times t in [0, 1] (1 = pure noise) by `config.train`'s scheme."""
  t = config.train
  if t.timestep_sampling == "logit_normal":
    u = jax.nn.sigmoid(t.logit_mean + t.logit_std * jax.random.normal(key, (batch,), jnp.float32))
  elif t.timestep_sampling == "uniform":
    u = jax.random.uniform(key, (batch,), jnp.float32)
  else:
    raise ValueError(
      f"config.train.timestep_sampling={t.timestep_sampling!r}; use one of {TIMESTEP_SAMPLING}."
    )
  if t.resolution_shift:
    # The sampler's sigma shift e^mu / (e^mu + (1/t - 1)), so training sees the sigmas it samples.
    shift = np.exp(FlowMatchSchedule().mu(image_seq_len))
    u = shift * u / (1 + (shift - 1) * u)
  return u


def flow_matching_loss(
  velocity: Callable[[jax.Array, jax.Array], jax.Array],
  x0: jax.Array,
  noise: jax.Array,
  t: jax.Array,
  weights: jax.Array | None = None,
) -> jax.Array:
  """mean((velocity(x_t, t) - (noise - x0))^2) with x_t = (1 - t) x0 + t noise, in fp32.

  x0 and noise are packed latents (B, N, C); t is (B,). With `weights` (B, N, C), the weighted
  mean sum(w * err^2) / sum(w).
  """
  x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
  tt = t.astype(jnp.float32)[:, None, None]
  x_t = (1 - tt) * x0 + tt * noise
  predicted = velocity(x_t, t).astype(jnp.float32)
  error = jnp.square(predicted - (noise - x0))
  if weights is None:
    return jnp.mean(error)
  weights = jnp.broadcast_to(weights.astype(jnp.float32), error.shape)
  return jnp.sum(weights * error) / jnp.sum(weights)


def object_weights(images: np.ndarray, object_weight: float) -> np.ndarray:
  """Per-pixel loss weights (B, H, W, 1): `object_weight` on the scene's objects (pixels the
  oracle gives a palette colour), 1 on the background.

  The objects cover a few percent of a synthetic image and the textured background the rest,
  so in the plain loss the prompt (which says only what the objects are) decides a few percent
  of the error, and a small model learns the background long before it learns to follow the
  prompt. Weighting the objects up makes the conditional part of the loss count.
  """
  labels = np.stack([oracle.color_labels(image) for image in images])
  return np.where(labels >= 0, object_weight, 1.0).astype(np.float32)[..., None]


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  config: Any,
  codec: synthetic.PixelCodec,
  geo: Geometry,
  negative: Embeds | None = None,
  t5_graphdef: nnx.GraphDef | None = None,
):
  """The pure step: (trainable, opt_state, frozen, batch, key) -> (trainable, opt_state, aux).

  `batch` holds `images` (B, H, W, 3) uint8, `prompt_embeds` (B, T, D) and `pooled` (B, P).
  With `train.prompt_dropout` = p > 0, each example's prompt is replaced by the empty prompt's
  embeddings `negative` (batch 1) with probability p, which teaches the unconditional velocity
  classifier-free guidance needs. `aux["finite"]` says whether the loss, the gradients and the
  updated parameters are finite.

  With `t5_graphdef` (`text.t5_trainable`), T5 trains with the transformer: `trainable` is
  `{"transformer": ..., "t5": ...}`, `batch` holds T5's `t5_ids` (B, T) instead of
  `prompt_embeds`, and `negative` is the empty prompt's `(t5_ids (1, T), pooled (1, P))`.
  """
  dropout = float(config.train.prompt_dropout)
  if dropout > 0 and negative is None:
    raise ValueError("train.prompt_dropout > 0 needs the empty prompt's embeddings (negative).")
  text_key = "prompt_embeds" if t5_graphdef is None else "t5_ids"

  def train_step(trainable, opt_state, frozen, batch, key):
    t_key, noise_key, drop_key = jax.random.split(key, 3)
    x0 = pack(codec.scale_latents(codec.encode(images_to_unit(batch["images"])).mode()))
    x0 = sharding.shard(x0, _TOKENS)
    weights = None
    if "weights" in batch:  # Pixel weights take the pixels' path into tokens (a reshape).
      pixel_weights = jnp.broadcast_to(batch["weights"], batch["images"].shape)
      weights = pack(codec.encode(pixel_weights).mode())
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    t = sample_timesteps(t_key, x0.shape[0], config, geo.image_seq_len)
    text, pooled = batch[text_key], batch["pooled"]
    if dropout > 0:
      drop = jax.random.bernoulli(drop_key, dropout, (x0.shape[0],))
      text = jnp.where(drop.reshape((-1,) + (1,) * (text.ndim - 1)), negative[0], text)
      pooled = jnp.where(drop[:, None], negative[1], pooled)

    def objective(trainable):
      if t5_graphdef is None:
        model, prompt_embeds = nnx.merge(graphdef, trainable, frozen), text
      else:
        model = nnx.merge(graphdef, trainable["transformer"], frozen)
        prompt_embeds = nnx.merge(t5_graphdef, trainable["t5"])(text)
      velocity = velocity_fn(
        model,
        prompt_embeds,
        pooled,
        geo.img_ids,
        geo.txt_ids,
        config.train.guidance,
      )
      return flow_matching_loss(velocity, x0, noise, t, weights)

    loss, grads = jax.value_and_grad(objective)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    aux = dict(loss=loss, grad_norm=optax.tree.norm(grads), t_mean=jnp.mean(t))
    aux["finite"] = (
      jnp.isfinite(loss) & jnp.isfinite(aux["grad_norm"]) & jnp.isfinite(optax.tree.norm(trainable))
    )
    return trainable, opt_state, aux

  return train_step


# --- Building -------------------------------------------------------------------------------------


class ParamsEMAState(NamedTuple):
  """The exponential moving average of the parameters, kept in the optimizer state (so it is
  checkpointed and restored with it)."""

  count: jax.Array
  ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
  """Tracks an EMA of the parameters after each update; passes the updates through unchanged.

  Sampling from the EMA is the usual way to get clean samples from a diffusion model whose
  weights still move with every noisy step. The decay ramps up as min(decay, (1 + n) / (10 + n))
  over the n-th update, so a short run is not dominated by the initial weights.
  """

  def init(params):
    return ParamsEMAState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

  def update(updates, state, params):
    if params is None:
      raise ValueError("params_ema needs the parameters: tx.update(grads, state, params).")
    count = state.count + 1
    d = jnp.minimum(decay, (1.0 + count) / (10.0 + count))
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(e.dtype), state.ema, new_params)
    return updates, ParamsEMAState(count, ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any | None:
  """The EMA parameters held in an optimizer state built by `make_optimizer`, or None."""
  is_ema = lambda x: isinstance(x, ParamsEMAState)  # noqa: E731
  states = [x for x in jax.tree.leaves(opt_state, is_leaf=is_ema) if is_ema(x)]
  return states[0].ema if states else None


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping, accumulation, and (with
  `train.ema_decay` > 0) an EMA of the parameters."""
  t = config.train
  k = max(
    1, t.grad_accum_steps
  )  # `steps`/`warmup_steps` count micro-batches, the schedule updates.
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=t.lr,
    warmup_steps=t.warmup_steps // k,
    decay_steps=max(t.steps // k, t.warmup_steps // k + 1),
    end_value=t.lr * t.end_lr_fraction,
  )
  parts = [
    optax.clip_by_global_norm(t.grad_clip),
    optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=t.weight_decay),
  ]
  if t.ema_decay > 0:
    parts.append(params_ema(t.ema_decay))
  tx = optax.chain(*parts)
  if t.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=t.grad_accum_steps)
  return tx


def build_codec(config: Any) -> synthetic.PixelCodec:
  c = config.codec
  return synthetic.PixelCodec(
    synthetic.PixelCodecConfig(
      downsample_factor=c.scale_factor, scaling_factor=c.scaling_factor, shift_factor=c.shift_factor
    )
  )


def build_prompt_encoder(config: Any) -> synthetic.PromptEncoder:
  """The frozen text encoders of `config.text`: random from `seed`, or with
  `t5_pretrained` (a `text_encoder_synthetic` final/ folder) T5 read from it (then `t5`'s sizes
  are the folder's) and CLIP random as without."""
  t = config.text
  return synthetic.build_prompt_encoder(
    seed=t.seed,
    max_length=t.max_length,
    t5=dict(t.t5),
    clip=dict(t.clip),
    t5_pretrained=t.get("t5_pretrained", ""),  # Absent in configs written before it existed.
  )


def flux_config(config: Any, codec: synthetic.PixelCodec, encoder: synthetic.PromptEncoder):
  """The FluxConfig of a new model: `config.model.flux` with the widths the codec and the
  encoders dictate."""
  m = config.model
  fields = dict(m.flux)
  fields["axes_dims_rope"] = tuple(fields.get("axes_dims_rope", FluxConfig.axes_dims_rope))
  return FluxConfig(
    **fields,
    in_channels=4 * codec.latent_channels,
    joint_attention_dim=encoder.joint_attention_dim,
    pooled_projection_dim=encoder.pooled_projection_dim,
    **runtime_kwargs(config),
  )


def runtime_kwargs(config: Any) -> dict[str, Any]:
  """FluxTransformer's runtime fields (dtypes, remat, attention, scan) from `config.model`."""
  m = config.model
  return dict(
    dtype=m.dtype,
    param_dtype=m.param_dtype,
    remat=m.remat,
    attention_impl=m.attention_impl or None,
    scan_layers=m.scan_layers,
  )


def adaln_zero(model: FluxTransformer) -> None:
  """DiT's adaLN-Zero initialisation for a model trained from scratch: every modulation layer
  (shifts, scales and the residual gates) and the output projection start at zero, so each
  block starts as the identity and the velocity as 0. DiT (Peebles & Xie, 2023) found it trains
  markedly faster than the default initialisation."""
  kinds = (layers.AdaLayerNormZero, layers.AdaLayerNormZeroSingle, layers.AdaLayerNormContinuous)
  modules = [m.linear for _, m in nnx.iter_modules(model) if isinstance(m, kinds)]
  for module in [*modules, model.proj_out]:
    for param in (module.kernel, module.bias):
      param[...] = jnp.zeros_like(param[...])


def build_model(config: Any, codec, encoder, mesh, rules) -> FluxTransformer:
  """The transformer (new, or read from `config.model.transformer`), with LoRA when configured,
  every parameter placed on the mesh as its logical names say."""
  m = config.model
  if m.trainable not in TRAINABLE:
    raise ValueError(f"config.model.trainable={m.trainable!r}; use one of {TRAINABLE}.")

  def add_lora(model: FluxTransformer) -> FluxTransformer:
    if m.trainable == "lora":
      lora.apply_lora(
        model,
        rank=m.lora_rank,
        alpha=m.lora_alpha,
        targets=list(m.lora_targets) or list(flux_params.lora_targets(m.lora_single_mlp)),
        rngs=nnx.Rngs(config.seed + 1),
      )
    return model

  def new_model() -> FluxTransformer:
    model = FluxTransformer(flux_config(config, codec, encoder), rngs=nnx.Rngs(config.seed))
    if m.zero_init:
      adaln_zero(model)
    return add_lora(model)

  if m.transformer:
    model = flux_params.from_pretrained(
      m.transformer, mesh=mesh, sharding_rules=config.sharding_rules, **runtime_kwargs(config)
    )
    with sharding.use_mesh(mesh, rules):
      model = add_lora(model)
  else:
    model = sharding.create_sharded(new_model, mesh, rules)
  fc = model.config
  wanted = dict(
    in_channels=4 * codec.latent_channels,
    joint_attention_dim=encoder.joint_attention_dim,
    pooled_projection_dim=encoder.pooled_projection_dim,
  )
  if differ := {k: (getattr(fc, k), v) for k, v in wanted.items() if getattr(fc, k) != v}:
    raise ValueError(
      f"The transformer ({m.transformer or 'config.model.flux'}) does not fit the codec and text "
      f"encoders (transformer -> needed): {differ}. Change config.codec / config.text."
    )
  return model


def batch_shard_count(mesh: jax.sharding.Mesh, rules: sharding.Rules) -> int:
  """How many ways the batch dimension is split (`act_batch`'s mesh axes)."""
  spec = sharding.logical_to_spec(("act_batch",), rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return int(np.prod([mesh.shape[a] for a in axes]))


def trainable_filter(trainable: str):
  return nnx.LoRAParam if trainable == "lora" else nnx.Param


def ensure_pairs(config: Any, workdir: str) -> str:
  """`config.data.pairs`, or (when empty) synthetic pairs built once into `<workdir>/pairs`."""
  if config.data.pairs:
    return config.data.pairs
  import ml_collections

  from spatial_jax.data import synthetic_job

  folder = os.path.join(workdir, "pairs")
  data_config = ml_collections.ConfigDict(dict(config.data.synthetic))
  data_config.seed = config.seed
  synthetic_job.run(data_config, folder)
  return folder


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


# --- Export ---------------------------------------------------------------------------------------


# --- The job --------------------------------------------------------------------------------------


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains, writes galleries and checkpoints, exports `final/`; returns the summary."""
  # -- Mesh ----------------------------------------------------------------------------------
  if jax.process_count() > 1:
    # Each process would feed its own slice (make_array_from_process_local_data) and encode its
    # own prompts; until that is written and tested, refuse clearly.
    raise NotImplementedError("flux_sft runs in one process (any number of local devices).")
  os.makedirs(workdir, exist_ok=True)  # main.py writes config.json; Colab and tests call run().
  metrics.write_config_json(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  if config.train.timestep_sampling not in TIMESTEP_SAMPLING:
    raise ValueError(
      f"config.train.timestep_sampling={config.train.timestep_sampling!r}; use one of "
      f"{TIMESTEP_SAMPLING}."
    )
  batch_shards = batch_shard_count(mesh, rules)
  if config.train.batch_size % batch_shards:
    raise ValueError(
      f"config.train.batch_size={config.train.batch_size} must be a multiple of the {batch_shards} "
      "shards of the batch axis (act_batch over the mesh)."
    )

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
    t5_params = jax.tree.map(jnp.copy, t5_params)  # The step donates them; the encoder keeps its.
    replicated = sharding.named_sharding(mesh, (), rules)
    trainable = dict(transformer=trainable, t5=t5_params)
    trainable_sh = dict(transformer=trainable_sh, t5=jax.tree.map(lambda _: replicated, t5_params))
    logging.info("T5 trains with the transformer: %.3fM parameters", count(t5_params) / 1e6)

  # -- Data ----------------------------------------------------------------------------------
  pairs_dir = ensure_pairs(config, workdir)
  train_iter = pair_loader.make_pairs_loader(
    pairs_dir,
    split=config.data.train_split,
    batch_size=config.train.batch_size,
    image_size=config.data.image_size,
    seed=config.seed,
  )
  gallery = load_gallery_prompts(pairs_dir, config)

  def device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    ids = encoder.tokenize(list(batch["prompt"]))
    if t5_graphdef is None:
      prompt_embeds, pooled = encoder.encode_ids(ids["t5_ids"], ids["clip_ids"])
      arrays = dict(images=batch["chosen"], prompt_embeds=prompt_embeds, pooled=pooled)
    else:  # The step encodes the T5 ids with the T5 it trains.
      pooled = encoder.encode_pooled(ids["clip_ids"])
      arrays = dict(images=batch["chosen"], t5_ids=ids["t5_ids"], pooled=pooled)
    if config.train.object_weight != 1.0:
      arrays["weights"] = object_weights(batch["chosen"], config.train.object_weight)
    return {
      k: jax.device_put(v, sharding.data_sharding(mesh, rules, np.ndim(v)))
      for k, v in arrays.items()
    }

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
  rng = jax.device_put(jax.random.key(config.seed), sharding.named_sharding(mesh, (), rules))
  ckpt = checkpoint.Checkpointer(
    workdir,
    max_to_keep=config.train.keep_checkpoints,
    save_interval_steps=config.train.checkpoint_every,
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
    ema = ema_params(opt_state)
    params = trainable if ema is None else ema
    if t5_graphdef is None:
      return params
    encoder.set_t5_params(jax.tree.map(jnp.copy, params["t5"]))  # The next step donates them.
    return params["transformer"]

  def write_gallery(step: int) -> dict[str, float]:
    if gallery_noise is None:
      return {}
    params = sampling_params()
    with sharding.use_mesh(mesh, rules):
      samples = p_sample(params, frozen, *encoder(gallery.prompts), gallery_noise, encoder([""]))
    samples = unit_to_uint8(samples)
    scores = oracle_scores(samples, gallery.prompts)
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
  from spatial_jax.reward.evaluate import History  # The same history.json as reward_train.

  progress = metrics.Progress(
    config.train.steps,
    every_secs=config.log_every_secs,
    name="train",
    writer=writer,
    start_step=start_step,
  )
  history = History.load(workdir)
  start_time = time.time()
  step = start_step
  last_gallery: dict[str, float] = {}
  try:
    with sharding.use_mesh(mesh, rules):
      for step in range(start_step + 1, config.train.steps + 1):
        batch = device_batch(next(train_iter))
        key = jax.random.fold_in(rng, step)
        trainable, opt_state, aux = p_step(trainable, opt_state, frozen, batch, key)
        log_now = step % config.log_every_steps == 0 or step == config.train.steps
        if log_now or step % config.train.checkpoint_every == 0:
          aux = jax.device_get(aux)
          checkpoint.check_finite(aux, step, ckpt, "flow-matching training", config.log_every_steps)
        if log_now:
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
