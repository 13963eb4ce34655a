"""The synthetic world's text-to-image generator: geometry, guided velocity, ODE sampling, the
oracle's verdict, and the exported folder that `flux_sft` writes and `sample` / `grpo` read.

Classifier-free guidance ("true CFG", diffusers FluxPipeline's `true_cfg_scale` with an empty
negative prompt): v = v(empty) + s * (v(prompt) - v(empty)). The tiny generator has no distilled
guidance embedding, and its conditional signal is a small part of the flow-matching loss (the
objects cover a few pixels of a textured background), so sampling it unguided draws scenes that
barely depend on the prompt; `flux_sft` drops prompts to the empty prompt during training
(`train.prompt_dropout`) so that v(empty) is a real unconditional velocity.

The exported folder (`export_generator`, `load_generator`):

  generator.json      codec settings, image size, sampling defaults (steps, guidance, cfg_scale)
  transformer/        a diffusers folder (config.json + safetensors, diffusers-named weights)
  text_encoders/      the frozen synthetic encoders' weights + config
  lora/               when the run trained LoRA: the adapter alone, as a diffusers LoRA file
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from spatial_jax import fileio, lora, metrics, sharding
from spatial_jax.data import oracle, perturb, scenes
from spatial_jax.diffusion import synthetic
from spatial_jax.diffusion.latents import image_ids, latent_size, text_ids, unpack
from spatial_jax.diffusion.sampler import sample_ode
from spatial_jax.diffusion.schedule import FlowMatchSchedule
from spatial_jax.models.flux import FluxTransformer
from spatial_jax.models.flux import params as flux_params

GENERATOR_FILE = "generator.json"

# (prompt_embeds (B, T, D), pooled (B, P)) of a batch of prompts.
Embeds = tuple[jax.Array, jax.Array]


def images_to_unit(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1], the codec's (and the VAE's) input range."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def unit_to_uint8(images: Any, source: str = "") -> np.ndarray:
  """Float images in [0, 1] (device or host) -> uint8 host arrays, as the oracle and PNGs take.
  An array that spans processes is gathered (then every process must call this).

  Raises:
    FloatingPointError: a non-finite pixel (`source` names the model that drew it).
  """
  if isinstance(images, jax.Array):
    images = sharding.to_host(images)
  images = np.asarray(images)
  bad = ~np.isfinite(images).reshape(len(images), -1).all(axis=1) if images.ndim else []
  if np.any(bad):
    raise FloatingPointError(
      f"The generator{' ' + source if source else ''} drew non-finite pixels in {int(np.sum(bad))} of "
      f"{len(images)} images (first: {int(np.argmax(bad))}): its weights are damaged or diverged."
    )
  return np.round(images * 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """The latent grid of one image size, and the constant position ids."""

  image_size: tuple[int, int]
  latent_hw: tuple[int, int]
  img_ids: np.ndarray
  txt_ids: np.ndarray

  @property
  def image_seq_len(self) -> int:
    return len(self.img_ids)


def geometry(image_size: int, codec: synthetic.PixelCodec, text_length: int) -> Geometry:
  h = w = int(image_size)
  f = codec.vae_scale_factor
  if h % (2 * f):
    raise ValueError(
      f"config.data.image_size={image_size} must be a multiple of 2 * codec scale factor ({2 * f}):"
      " latents are packed in 2x2 patches."
    )
  lh, lw = latent_size(h, w, f)
  return Geometry((h, w), (lh, lw), image_ids(lh // 2, lw // 2), text_ids(text_length))


def velocity_fn(
  model: FluxTransformer,
  prompt_embeds: jax.Array,
  pooled: jax.Array,
  img_ids: np.ndarray,
  txt_ids: np.ndarray,
  guidance: float,
  *,
  cfg_scale: float = 1.0,
  negative: Embeds | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """v(x, t) of the transformer for one batch of prompts (guidance only where the model has it).

  With `cfg_scale` != 1, `negative` (the empty prompt's embeddings, batch 1 or B) gives the
  unconditional velocity and v = v_neg + cfg_scale * (v_pos - v_neg); both halves run as one
  batch of 2B, as Flow-GRPO's SD3 pipeline does.
  """
  g = jnp.float32(guidance) if model.config.guidance_embeds else None
  if cfg_scale == 1.0:

    def velocity(x: jax.Array, t: jax.Array) -> jax.Array:
      return model(x, prompt_embeds, pooled, t, img_ids, txt_ids, guidance=g)

    return velocity
  if negative is None:
    raise ValueError(f"cfg_scale={cfg_scale} needs the negative (empty) prompt's embeddings.")
  batch = prompt_embeds.shape[0]
  neg_embeds, neg_pooled = (jnp.broadcast_to(a, (batch, *a.shape[1:])) for a in negative)
  both_embeds = jnp.concatenate([neg_embeds, prompt_embeds])
  both_pooled = jnp.concatenate([neg_pooled, pooled])

  def guided(x: jax.Array, t: jax.Array) -> jax.Array:
    t = jnp.broadcast_to(t, (batch,))
    v = model(
      jnp.concatenate([x, x]),
      both_embeds,
      both_pooled,
      jnp.concatenate([t, t]),
      img_ids,
      txt_ids,
      guidance=g,
    )
    v_neg, v_pos = v[:batch], v[batch:]
    return v_neg + cfg_scale * (v_pos - v_neg)

  return guided


def make_sampler(
  graphdef: nnx.GraphDef,
  codec: synthetic.PixelCodec,
  geo: Geometry,
  *,
  num_steps: int,
  guidance: float,
  cfg_scale: float = 1.0,
  schedule: FlowMatchSchedule | None = None,
):
  """(trainable, frozen, prompt_embeds, pooled, noise, negative=None) -> images (B, H, W, 3)
  float in [0, 1].

  The Euler ODE from the packed `noise` (B, N, C) at sigma 1 to 0 on the FLUX schedule's sigmas;
  `negative` (the empty prompt's embeddings) is needed when `cfg_scale` != 1.
  """
  sigmas = (schedule or FlowMatchSchedule()).sigmas(num_steps, geo.image_seq_len)

  def sample(trainable, frozen, prompt_embeds, pooled, noise, negative=None):
    model = nnx.merge(graphdef, trainable, frozen)
    velocity = velocity_fn(
      model,
      prompt_embeds,
      pooled,
      geo.img_ids,
      geo.txt_ids,
      guidance,
      cfg_scale=cfg_scale,
      negative=negative,
    )
    return decode_to_unit(codec, geo, sample_ode(velocity, noise, sigmas))

  return sample


def decode_to_unit(codec: synthetic.PixelCodec, geo: Geometry, packed: jax.Array) -> jax.Array:
  """Packed latents (B, N, C) -> images (B, H, W, 3) float in [0, 1]."""
  latents = unpack(packed, *geo.latent_hw)
  images = codec.decode(codec.unscale_latents(latents.astype(jnp.float32)))
  return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


def oracle_scores(images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
  """The oracle's mean verdict on generated images: relations satisfied, objects found.

  `*_control` scores each image against the NEXT image's prompt: what a generator that ignores
  its prompt would get (the oracle finds an object by its colour, so colourful noise finds
  some). The gap between the two is what the prompt does.
  """

  def verdict(paired_prompts: Sequence[str]) -> tuple[float, float]:
    results = [oracle.score_prompt(im, p) for im, p in zip(images, paired_prompts, strict=True)]
    return (
      float(np.mean([r.fraction for r in results])),
      float(np.mean([np.mean(r.found) for r in results])),
    )

  prompts = list(prompts)
  relations, objects = verdict(prompts)
  scores = dict(relations=relations, objects=objects)
  if len(prompts) > 1:
    scores["relations_control"], scores["objects_control"] = verdict(prompts[1:] + prompts[:1])
  return scores


def oracle_report(images: np.ndarray, prompts: list[str], per_prompt: int) -> dict[str, Any]:
  """The oracle's verdicts on `images` (prompt-major, `per_prompt` each) overall, on short
  (one-relation) and long prompts; {} when a prompt is not of the scene grammar.

  Besides `oracle_scores` (with its other-prompt control), `relations_perturbed`
  scores each image against its prompt with one relation changed (`perturb_prompt`, as the
  pairs are made): a generator that draws the right objects at random places satisfies it as
  often as the prompt itself, so the gap between the two is spatial accuracy above chance.
  """
  try:
    relation_counts = [len(scenes.parse_prompt(p).relations) for p in prompts]
  except ValueError:
    return {}
  repeated = [p for p in prompts for _ in range(per_prompt)]
  perturbed = [perturb.perturb_prompt(p, seed=i) or p for i, p in enumerate(repeated)]
  is_long = np.repeat(np.array(relation_counts) > 1, per_prompt)
  report = {}
  for name, rows in (("all", np.ones(len(repeated), bool)), ("short", ~is_long), ("long", is_long)):
    if not rows.any():
      continue
    own = [p for p, keep in zip(repeated, rows, strict=True) if keep]
    changed = [p for p, keep in zip(perturbed, rows, strict=True) if keep]
    scores = oracle_scores(images[rows], own)
    scores["relations_perturbed"] = oracle_scores(images[rows], changed)["relations"]
    report[name] = dict(count=int(rows.sum()), **scores)
  return report


def gallery_grid(samples: np.ndarray, references: np.ndarray, ncols: int) -> np.ndarray:
  """Rows of `ncols` samples, each followed by the row of their reference renders."""
  ncols = max(1, min(ncols, len(samples)))
  rows = []
  for start in range(0, len(samples), ncols):
    for group in (samples[start : start + ncols], references[start : start + ncols]):
      pad = np.zeros((ncols - len(group), *group.shape[1:]), group.dtype)
      rows.append(np.concatenate([group, pad]))
  return np.concatenate(rows)


def export_generator(
  directory: str,
  model: FluxTransformer,
  encoder: synthetic.PromptEncoder,
  *,
  codec: dict[str, Any],
  image_size: int,
  sampling: dict[str, Any],
  step: int,
  trained_from: str,
) -> str:
  """Writes the generator into `directory` (see the module docstring); returns it.

  `sampling` holds the defaults samplers use (num_steps, guidance, cfg_scale). With LoRA, the
  adapter is written first, then merged into the transformer (in place: call this last).
  """
  has_lora = bool(lora.lora_layers(model))
  if has_lora:
    flux_params.export_lora(model, os.path.join(directory, "lora"))
    lora.merge(model)
  flux_params.save_pretrained(model, os.path.join(directory, "transformer"))
  if jax.process_index() != 0:
    return directory
  synthetic.save_text_encoders(encoder, os.path.join(directory, "text_encoders"))
  info = dict(
    transformer="transformer",
    text_encoders="text_encoders",
    lora="lora" if has_lora else None,
    codec=dict(codec),
    image_size=int(image_size),
    sampling=dict(sampling),
    step=int(step),
    trained_from=trained_from,
  )
  fileio.write_atomic(os.path.join(directory, GENERATOR_FILE), metrics.to_json(info).encode())
  fileio.write_checksums(directory)  # Checked by load_generator.
  logging.info("Wrote the generator (step %d) to %s", step, directory)
  return directory


@dataclasses.dataclass
class Generator:
  """An exported generator: the transformer, the codec, the prompt encoder and its settings."""

  transformer: FluxTransformer
  codec: synthetic.PixelCodec
  prompt_encoder: synthetic.PromptEncoder
  info: dict[str, Any]

  @property
  def image_size(self) -> int:
    return int(self.info["image_size"])

  @property
  def sampling(self) -> dict[str, Any]:
    """Sampling defaults: num_steps, guidance and cfg_scale (1.0 for folders written before
    guidance existed)."""
    return dict(dict(num_steps=20, guidance=1.0, cfg_scale=1.0), **self.info.get("sampling", {}))

  def geometry(self) -> Geometry:
    return geometry(self.image_size, self.codec, self.prompt_encoder.max_length)

  def negative_embeds(self) -> Embeds:
    """The empty prompt's embeddings (batch 1): CFG's unconditional branch."""
    return self.prompt_encoder([""])


def load_generator(directory: str | os.PathLike, **transformer_kwargs: Any) -> Generator:
  """Reads what `export_generator` wrote (e.g. `<workdir>/final`); `transformer_kwargs` go to
  `flux.params.from_pretrained` (dtype, mesh, sharding_rules, scan_layers, ...)."""
  directory = os.fspath(directory)
  path = os.path.join(directory, GENERATOR_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {GENERATOR_FILE} in {directory!r}: not an exported generator.")
  fileio.verify_checksums(directory, "the generator folder")
  with open(path) as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(
        f"{path} is not valid JSON ({e}): the generator folder is damaged (export it again)."
      ) from e
  c = info["codec"]
  codec = synthetic.PixelCodec(
    synthetic.PixelCodecConfig(
      downsample_factor=c["scale_factor"],
      scaling_factor=c["scaling_factor"],
      shift_factor=c["shift_factor"],
    )
  )
  transformer = flux_params.from_pretrained(
    os.path.join(directory, info["transformer"]), **transformer_kwargs
  )
  encoder = synthetic.load_text_encoders(os.path.join(directory, info["text_encoders"]))
  return Generator(transformer, codec, encoder, info)
