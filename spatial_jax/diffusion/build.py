"""Building the synthetic-world generator from a config: the pixel codec, the prompt encoders,
the FLUX transformer (new with adaLN-Zero, or read from a diffusers folder; LoRA when asked) and
its runtime fields, and the optimizer `flux_sft` trains it with."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax
from flax import nnx

from spatial_jax import lora, optim, sharding
from spatial_jax.diffusion import synthetic
from spatial_jax.models.flux import FluxConfig, FluxTransformer, layers
from spatial_jax.models.flux import params as flux_params

TRAINABLE = ("all", "lora")


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """`optim.adamw_warmup_cosine` of `config.train` (with its EMA when `train.ema_decay` > 0)."""
  return optim.adamw_warmup_cosine(config.train)


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


def trainable_filter(trainable: str):
  """The nnx filter of the parameters `config.model.trainable` trains."""
  return nnx.LoRAParam if trainable == "lora" else nnx.Param
