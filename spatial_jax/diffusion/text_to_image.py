"""A text-to-image model as sampling, GRPO, `sample` and `pairs_generate` use it: a FLUX
transformer (with LoRA for GRPO), the frozen parts around it, and its deterministic sampler.

One interface over the two worlds, so every job has one code path:

- a diffusers FluxPipeline folder (`config.model.pipeline`, e.g. FLUX.1-dev): T5 + CLIP prompt
  encoding, the VAE decoder, guidance through FLUX.1-dev's distilled guidance embedding;
- a synthetic-world generator folder written by `flux_sft` (`config.model.generator`): the tiny
  text encoders, the pixel codec, classifier-free guidance against the empty prompt;
- neither (smoke runs): a tiny random generator from `config.model.tiny`.

For GRPO the transformer gets LoRA adapters (`config.lora`); the policy's trainable state is the
LoRA params only, and the reference policy of the KL term is the same model with the adapters
zeroed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from spatial_jax import lora, sharding
from spatial_jax.diffusion import generator as generator_lib
from spatial_jax.diffusion import synthetic
from spatial_jax.diffusion.build import runtime_kwargs
from spatial_jax.diffusion.generator import Embeds, Geometry
from spatial_jax.diffusion.latents import image_ids, latent_size, text_ids
from spatial_jax.diffusion.sampler import sample_ode
from spatial_jax.models.flux import FluxConfig, FluxTransformer
from spatial_jax.models.flux import params as flux_params


@dataclasses.dataclass
class TextToImage:
  """What sampling and the GRPO loop need of a text-to-image model.

  Attributes:
    transformer: the FLUX transformer, with LoRA applied.
    encode: host-side prompts -> (prompt_embeds, pooled).
    decode: packed latents (B, N, C) -> images (B, H, W, 3) float in [0, 1]; called outside
      `jax.jit` (it is jitted itself: a diffusers pipeline's decode enters its own mesh).
    geo: the latent grid and position ids of the training resolution.
    guidance: the distilled guidance value (models with guidance embeddings only).
    cfg_scale: true classifier-free guidance against `negative` (1.0: off).
    negative: the empty prompt's embeddings (batch 1), or None without CFG.
    source: what the policy was built from (recorded in checkpoints and reports).
    generator: the synthetic generator the policy wraps (None for a diffusers pipeline).
  """

  transformer: FluxTransformer
  encode: Callable[[Sequence[str]], Embeds]
  decode: Callable[[jax.Array], jax.Array]
  geo: Geometry
  guidance: float
  cfg_scale: float
  negative: Embeds | None
  source: str
  generator: generator_lib.Generator | None = None

  @property
  def latent_shape(self) -> tuple[int, int]:
    """(tokens, channels) of one packed latent."""
    return self.geo.image_seq_len, self.transformer.config.in_channels

  def velocity(self, model: FluxTransformer, prompt_embeds: jax.Array, pooled: jax.Array):
    """v(x, sigma) in fp32 for a merged `model` (the policy's or the reference's)."""
    v = generator_lib.velocity_fn(
      model,
      prompt_embeds,
      pooled,
      self.geo.img_ids,
      self.geo.txt_ids,
      self.guidance,
      cfg_scale=self.cfg_scale,
      negative=self.negative,
    )
    # The SDE math is fp32 (grpo.md §1.2); a bf16 model is cast back here, the same way in the
    # rollout and in training, so that the first ratio is exactly 1.
    return lambda x, sigma: v(x.astype(model.config.dtype), sigma).astype(jnp.float32)


def _add_lora(model: FluxTransformer, config: Any) -> FluxTransformer:
  c = config.lora
  targets = list(c.targets) or list(flux_params.lora_targets(c.single_mlp))
  lora.apply_lora(model, rank=c.rank, alpha=c.alpha, targets=targets, rngs=nnx.Rngs(config.seed))
  return model


def _cfg_scale(config: Any, default: float) -> float:
  """`config.sampling.cfg_scale`, or the model's own default when it is negative."""
  value = float(config.sampling.cfg_scale)
  return float(default) if value < 0 else value


def _from_pipeline(config: Any, mesh, rules, add_lora: bool) -> TextToImage:
  from spatial_jax.diffusion.pipeline import FluxPipeline  # Lazy: the real-world path only.

  m = config.model
  pipe = FluxPipeline.from_pretrained(
    m.pipeline,
    dtype=m.dtype,
    mesh=mesh,
    max_sequence_length=m.max_sequence_length,
  )
  if add_lora:
    with sharding.use_mesh(mesh, rules):
      _add_lora(pipe.transformer, config)
  size = int(config.data.image_size)
  cfg = _cfg_scale(config, 1.0)  # FLUX.1-dev guides through its guidance embedding instead.
  lh, lw = latent_size(size, size, pipe.vae_scale_factor)
  geo = Geometry(
    (size, size), (lh, lw), image_ids(lh // 2, lw // 2), text_ids(m.max_sequence_length)
  )
  return TextToImage(
    transformer=pipe.transformer,
    encode=pipe.encode_prompt,
    decode=lambda packed: pipe.decode(packed, lh, lw),
    geo=geo,
    guidance=float(config.sampling.guidance),
    cfg_scale=cfg,
    negative=pipe.encode_prompt([""]) if cfg != 1.0 else None,
    source=m.pipeline,
  )


def _tiny_generator(config: Any, mesh, rules) -> generator_lib.Generator:
  """A random tiny generator (smoke runs and tests): the flux_sft architecture, untrained."""
  t = config.model.tiny
  encoder = synthetic.build_prompt_encoder(
    seed=config.seed, max_length=t.max_length, t5=dict(t.t5), clip=dict(t.clip)
  )
  codec = synthetic.PixelCodec(synthetic.PixelCodecConfig(downsample_factor=t.scale_factor))
  fields = dict(t.flux)
  fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
  flux_config = FluxConfig(
    **fields,
    in_channels=4 * codec.latent_channels,
    joint_attention_dim=encoder.joint_attention_dim,
    pooled_projection_dim=encoder.pooled_projection_dim,
    **runtime_kwargs(config),
  )
  transformer = sharding.create_sharded(
    lambda: FluxTransformer(flux_config, rngs=nnx.Rngs(config.seed)), mesh, rules
  )
  info = dict(
    image_size=config.data.image_size,
    codec=dict(scale_factor=t.scale_factor, scaling_factor=1.0, shift_factor=0.0),
  )
  return generator_lib.Generator(transformer, codec, encoder, info)


def load_text_to_image(
  config: Any, mesh: jax.sharding.Mesh, rules: sharding.Rules, *, add_lora: bool = True
) -> TextToImage:
  """The policy `config.model` names (see the module docstring) on `mesh`, with new LoRA
  adapters from `config.lora` when `add_lora`. A negative `config.sampling.cfg_scale` takes the
  model's own default (the generator's `sampling.cfg_scale`; 1.0 for a pipeline)."""
  m = config.model
  if m.pipeline and m.generator:
    raise ValueError(
      "Set one of config.model.pipeline (a diffusers FLUX folder) and config.model.generator "
      "(a flux_sft export), not both."
    )
  if m.pipeline:
    return _from_pipeline(config, mesh, rules, add_lora)
  if m.generator:
    gen = generator_lib.load_generator(
      m.generator, mesh=mesh, sharding_rules=config.sharding_rules, **runtime_kwargs(config)
    )
    source = m.generator
  elif m.get("tiny"):
    logging.warning("config.model names no generator: a random tiny one (smoke runs).")
    gen = _tiny_generator(config, mesh, rules)
    source = "synthetic:tiny-random"
  else:
    raise ValueError(
      "config.model.pipeline is empty: set it to a local diffusers FLUX folder (e.g. FLUX.1-dev)."
    )
  if gen.image_size != config.data.image_size:
    raise ValueError(
      f"The generator draws {gen.image_size}x{gen.image_size} images but "
      f"config.data.image_size={config.data.image_size}."
    )
  if add_lora:
    with sharding.use_mesh(mesh, rules):
      _add_lora(gen.transformer, config)
  geo = gen.geometry()
  cfg = _cfg_scale(config, gen.sampling["cfg_scale"])
  return TextToImage(
    transformer=gen.transformer,
    encode=gen.prompt_encoder,
    decode=jax.jit(functools.partial(generator_lib.decode_to_unit, gen.codec, geo)),
    geo=geo,
    guidance=float(config.sampling.guidance),
    cfg_scale=cfg,
    negative=gen.negative_embeds() if cfg != 1.0 else None,
    source=source,
    generator=gen,
  )


def make_ode_sampler(graphdef: nnx.GraphDef, policy: TextToImage, sigmas: jax.Array):
  """(trainable, frozen, prompt_embeds, pooled, noise) -> packed latents of the deterministic
  (Euler ODE) samples that evaluation, galleries and `sample` use; `policy.decode` them
  (outside the jit)."""

  def sample(trainable, frozen, prompt_embeds, pooled, noise):
    model = nnx.merge(graphdef, trainable, frozen)
    velocity = policy.velocity(model, prompt_embeds, pooled)
    return sample_ode(velocity, noise, sigmas)

  return sample
