"""FLUX text-to-image in JAX: diffusers' `FluxPipeline` on our NNX ports.

    pipe = FluxPipeline.from_pretrained("FLUX.1-dev", dtype="bfloat16")
    images = pipe(["a red cube left of a blue sphere"], rng=jax.random.key(0))  # (B, H, W, 3)

The steps and their numerics follow diffusers 0.42.1 (flux.md §6):

  1. Prompts: CLIP pads to its `model_max_length` and gives the pooled vector; T5 pads to
     `max_sequence_length` and is called without an attention mask (as diffusers and BFL do).
  2. Latents: (B, H/f, W/f, C) Gaussian noise with f the VAE's scale factor, packed into
     (B, N, 4C) tokens of 2x2 patches; or the caller's packed latents, as diffusers' `latents=`.
  3. Sigmas on the host (numpy): `linspace(1, 1/n, n)` shifted by mu(N) (flux.md §8).
  4. One jitted function runs all Euler steps as a `lax.scan` whose body calls the transformer
     (`sample_ode`); the model enters as `nnx.split` state, so the trace depends only on its
     structure and on the shapes (one compile per shape, live weights on every call).
  5. Unpack, `z / scaling_factor + shift_factor`, VAE decode, then `(x / 2 + 0.5).clip(0, 1)`:
     diffusers' `VaeImageProcessor.postprocess(output_type="np")`.

Components are duck-typed, so any objects with the same call signatures plug in (the synthetic
world's pixel codec and tiny text encoders): the transformer `model(x, txt, pooled, sigma,
img_ids, txt_ids, guidance)` with a `config.in_channels` (and optional `guidance_embeds`); the
VAE `decode` and `unscale_latents`, and a `vae_scale_factor` attribute or a
`config.block_out_channels`; the encoders `clip(ids).pooler_output` and `t5(ids)` (an array, or
an object with `.last_hidden_state`); the tokenizers are called like Hugging Face tokenizers.
An `nnx.Module` component runs under `jax.jit`; anything else is called as is (the sampler's
`lax.scan` still traces the transformer once).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from spatial_jax import hf
from spatial_jax import sharding as sharding_lib
from spatial_jax.diffusion.latents import image_ids, latent_size, pack, text_ids, unpack
from spatial_jax.diffusion.sampler import sample_ode
from spatial_jax.diffusion.schedule import FlowMatchSchedule

# The sub-folders of a diffusers FluxPipeline folder that text-to-image needs, and what each
# holds (model_index.json names the same components).
COMPONENTS = {
  "transformer": "the FluxTransformer2DModel",
  "vae": "the AutoencoderKL",
  "text_encoder": "the CLIP text model",
  "tokenizer": "the CLIP tokenizer",
  "text_encoder_2": "the T5 encoder",
  "tokenizer_2": "the T5 tokenizer",
  "scheduler": "the FlowMatchEulerDiscreteScheduler config",
}

# diffusers' fallback when the pipeline has no CLIP tokenizer (`tokenizer_max_length`).
_CLIP_MAX_LENGTH = 77

Prompt = str | Sequence[str]


# --- Jitted pieces --------------------------------------------------------------------------------
# Module-level functions, so that (function, graphdef) is a stable static key of the jit cache.


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_apply(fn: Callable[..., Any], graphdef: nnx.GraphDef, state: nnx.State, *args: Any):
  return fn(nnx.merge(graphdef, state), *args)


def _apply(fn: Callable[..., Any], module: Any, *args: Any) -> Any:
  """`fn(module, *args)`, jitted when `module` is an nnx.Module.

  The module goes in as (graphdef, state): the compiled function is reused for any weights of
  the same structure (a LoRA update, another checkpoint), and the call always sees the module's
  current weights. Forward passes change no state, so nothing is merged back.
  """
  if isinstance(module, nnx.Module):
    graphdef, state = nnx.split(module)
    return _jit_apply(fn, graphdef, state, *args)
  return fn(module, *args)


def _clip_pooled(text_encoder: Any, input_ids: jax.Array) -> jax.Array:
  # FLUX conditions on CLIP's pooled output only (flux.md §6).
  return text_encoder(input_ids).pooler_output


def _t5_states(text_encoder_2: Any, input_ids: jax.Array) -> jax.Array:
  # No attention mask: diffusers and BFL let T5 attend to the padding too (flux.md §6).
  out = text_encoder_2(input_ids)
  return getattr(out, "last_hidden_state", out)


def _denoise(
  transformer: Any,
  latents: jax.Array,
  prompt_embeds: jax.Array,
  pooled: jax.Array,
  sigmas: jax.Array,
  img_ids: jax.Array,
  txt_ids: jax.Array,
  guidance: jax.Array | None,
) -> jax.Array:
  def velocity(x: jax.Array, sigma: jax.Array) -> jax.Array:
    # The transformer takes sigma in [0, 1] (diffusers passes timestep / 1000, flux.md §6).
    v = transformer(x, prompt_embeds, pooled, sigma, img_ids, txt_ids, guidance)
    # A scan carry keeps one dtype; diffusers steps in the latents' dtype too.
    return v.astype(x.dtype)

  return sample_ode(velocity, latents, sigmas)


def _decode(vae: Any, latents: jax.Array) -> jax.Array:
  images = vae.decode(vae.unscale_latents(latents))
  # VaeImageProcessor.postprocess(output_type="np"): denormalize from [-1, 1] and clamp.
  return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


# --- The pipeline ---------------------------------------------------------------------------------


def _vae_scale_factor(vae: Any) -> int:
  """The VAE's spatial downsampling: its own `vae_scale_factor`, else diffusers'
  `2 ** (len(block_out_channels) - 1)` (8 for FLUX, flux.md §6)."""
  factor = getattr(vae, "vae_scale_factor", None)
  if factor is None:
    config = getattr(vae, "config", None)
    if config is None or not hasattr(config, "block_out_channels"):
      raise ValueError(
        "The VAE needs a `vae_scale_factor` attribute or a `config.block_out_channels`."
      )
    factor = 2 ** (len(config.block_out_channels) - 1)
  return int(factor)


class FluxPipeline:
  """diffusers' `FluxPipeline` (text-to-image, distilled guidance) in JAX.

  Attributes:
    transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2: the components.
    schedule: the `FlowMatchSchedule` (diffusers' scheduler config).
    max_sequence_length: T5's padded prompt length (512 for FLUX.1-dev).
    vae_scale_factor: the VAE's downsampling (8 for FLUX).
    tokenizer_max_length: CLIP's padded prompt length (the tokenizer's `model_max_length`).
    mesh, sharding_rules: when a mesh is given, every jitted call runs under it with these
      logical rules (`sharding.use_mesh`), so the models' activation constraints apply.
  """

  def __init__(
    self,
    transformer: Any,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    text_encoder_2: Any,
    tokenizer_2: Any,
    schedule: FlowMatchSchedule,
    *,
    max_sequence_length: int = 512,
    mesh: Mesh | None = None,
    sharding_rules: Any = None,
  ):
    self.transformer = transformer
    self.vae = vae
    self.text_encoder = text_encoder
    self.tokenizer = tokenizer
    self.text_encoder_2 = text_encoder_2
    self.tokenizer_2 = tokenizer_2
    self.schedule = schedule
    self.max_sequence_length = int(max_sequence_length)
    self.vae_scale_factor = _vae_scale_factor(vae)
    self.tokenizer_max_length = int(getattr(tokenizer, "model_max_length", _CLIP_MAX_LENGTH))
    self.mesh = mesh
    self.sharding_rules = sharding_lib.resolve_rules(sharding_rules) if mesh is not None else None

  # --- Loading ------------------------------------------------------------------------------------

  @classmethod
  def from_pretrained(
    cls,
    local_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    sharding_rules: Any = None,
    max_sequence_length: int = 512,
    attention_impl: str | None = None,
  ) -> FluxPipeline:
    """Reads a diffusers FluxPipeline folder (e.g. a FLUX.1-dev snapshot).

    Args:
      local_dir: the folder with `model_index.json` and the sub-folders of `COMPONENTS`.
      dtype: compute (and parameter) dtype of every model, e.g. "bfloat16".
      mesh: place every weight sharded on this mesh as it is read, and run under it.
      sharding_rules: logical -> mesh rule overrides (`sharding.resolve_rules`).
      max_sequence_length: T5's padded prompt length.
      attention_impl: the transformer's attention (`models/attention.py`; None: XLA's).

    Raises:
      FileNotFoundError: no model_index.json, or a missing sub-folder (named).
      hf.LoadError: a checkpoint that does not match its model (from the model loaders).
    """
    from transformers import AutoTokenizer  # Host-side only; slow to import.

    from spatial_jax.models.clip import params as clip_params
    from spatial_jax.models.flux import params as flux_params
    from spatial_jax.models.t5 import params as t5_params
    from spatial_jax.models.vae import params as vae_params

    local_dir = os.fspath(local_dir)
    index = hf.read_config(local_dir, "model_index.json")
    for name, what in COMPONENTS.items():
      entry = index.get(name)
      if name in index and (not isinstance(entry, list) or None in entry):
        raise FileNotFoundError(
          f"{local_dir}/model_index.json sets no {name!r} ({what}): {entry!r}; "
          "text-to-image needs every component."
        )
      if not os.path.isdir(os.path.join(local_dir, name)):
        raise FileNotFoundError(
          f"{local_dir} has no {name}/ sub-folder ({what}); a diffusers FluxPipeline folder "
          f"holds {', '.join(f'{n}/' for n in COMPONENTS)}."
        )

    def path(name: str) -> str:
      return os.path.join(local_dir, name)

    models = dict(dtype=dtype, mesh=mesh, sharding_rules=sharding_rules)
    return cls(
      transformer=flux_params.from_pretrained(
        path("transformer"), **models, attention_impl=attention_impl
      ),
      vae=vae_params.from_pretrained(path("vae"), **models),
      text_encoder=clip_params.from_pretrained(path("text_encoder"), **models),
      tokenizer=AutoTokenizer.from_pretrained(path("tokenizer")),
      text_encoder_2=t5_params.from_pretrained(path("text_encoder_2"), **models),
      tokenizer_2=AutoTokenizer.from_pretrained(path("tokenizer_2")),
      schedule=FlowMatchSchedule.from_config(
        hf.read_config(path("scheduler"), "scheduler_config.json")
      ),
      max_sequence_length=max_sequence_length,
      mesh=mesh,
      sharding_rules=sharding_rules,
    )

  # --- Steps --------------------------------------------------------------------------------------

  def _context(self) -> contextlib.AbstractContextManager:
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding_lib.use_mesh(self.mesh, self.sharding_rules)

  @property
  def guidance_embeds(self) -> bool:
    return bool(getattr(getattr(self.transformer, "config", None), "guidance_embeds", False))

  @property
  def num_latent_channels(self) -> int:
    # A packed token holds a 2x2 patch of every latent channel (flux.md §6).
    return self.transformer.config.in_channels // 4

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP ids (B, tokenizer_max_length), T5 ids (B, max_sequence_length)), host side."""
    prompts = list(prompts)
    clip_ids = self.tokenizer(
      prompts,
      padding="max_length",
      max_length=self.tokenizer_max_length,
      truncation=True,
      return_tensors="np",
    )["input_ids"]
    t5_ids = self.tokenizer_2(
      prompts,
      padding="max_length",
      max_length=self.max_sequence_length,
      truncation=True,
      return_tensors="np",
    )["input_ids"]
    return np.asarray(clip_ids), np.asarray(t5_ids)

  def encode_prompt(
    self, prompts: Prompt, num_images_per_prompt: int = 1
  ) -> tuple[jax.Array, jax.Array]:
    """diffusers' `encode_prompt` (flux.md §6).

    Returns:
      prompt_embeds (B * n, max_sequence_length, joint_attention_dim) from T5 and pooled
      (B * n, pooled_projection_dim) from CLIP, each prompt's copies adjacent (as diffusers
      repeats them).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    clip_ids, t5_ids = self.tokenize(prompts)
    with self._context():
      pooled = _apply(_clip_pooled, self.text_encoder, jnp.asarray(clip_ids))
      prompt_embeds = _apply(_t5_states, self.text_encoder_2, jnp.asarray(t5_ids))
    if num_images_per_prompt > 1:
      pooled = jnp.repeat(pooled, num_images_per_prompt, axis=0)
      prompt_embeds = jnp.repeat(prompt_embeds, num_images_per_prompt, axis=0)
    return prompt_embeds, pooled

  def prepare_latents(
    self,
    batch: int,
    latent_height: int,
    latent_width: int,
    dtype: Any = jnp.float32,
    *,
    latents: Any = None,
    rng: jax.Array | None = None,
  ) -> jax.Array:
    """Packed initial latents (batch, N, 4C): the caller's, checked, or noise from `rng`."""
    tokens = (latent_height // 2) * (latent_width // 2)
    shape = (batch, tokens, 4 * self.num_latent_channels)
    if latents is not None:
      latents = jnp.asarray(latents)
      if latents.shape != shape:
        raise ValueError(
          f"latents must be packed (batch, tokens, channels) = {shape} for a "
          f"{latent_height}x{latent_width} latent grid, got {latents.shape}"
        )
      return latents.astype(dtype)
    if rng is None:
      raise ValueError("Pass either `latents` or a PRNG key `rng` to draw them from.")
    # Drawn in NHWC and packed, as diffusers draws (B, C, h, w) and packs (flux.md §6).
    noise = jax.random.normal(
      rng, (batch, latent_height, latent_width, self.num_latent_channels), jnp.float32
    )
    return pack(noise).astype(dtype)

  def denoise(
    self,
    latents: jax.Array,
    prompt_embeds: jax.Array,
    pooled: jax.Array,
    sigmas: np.ndarray | jax.Array,
    latent_height: int,
    latent_width: int,
    guidance_scale: float = 3.5,
  ) -> jax.Array:
    """Runs the Euler ODE from sigmas[0] to sigmas[-1] in one jitted call; packed in and out."""
    batch = latents.shape[0]
    guidance = jnp.full((batch,), guidance_scale, jnp.float32) if self.guidance_embeds else None
    with self._context():
      return _apply(
        _denoise,
        self.transformer,
        latents,
        prompt_embeds,
        pooled,
        jnp.asarray(sigmas, jnp.float32),
        jnp.asarray(image_ids(latent_height // 2, latent_width // 2)),
        jnp.asarray(text_ids(prompt_embeds.shape[1])),
        guidance,
      )

  def decode(self, latents: jax.Array, latent_height: int, latent_width: int) -> jax.Array:
    """Packed latents -> images (B, H, W, 3) float32 in [0, 1]."""
    with self._context():
      return _apply(_decode, self.vae, unpack(latents, latent_height, latent_width))

  def __call__(
    self,
    prompt: Prompt,
    *,
    height: int = 1024,
    width: int = 1024,
    num_inference_steps: int = 28,
    guidance_scale: float = 3.5,
    latents: Any = None,
    rng: jax.Array | None = None,
    num_images_per_prompt: int = 1,
  ) -> jax.Array:
    """Text to images, as `diffusers.FluxPipeline(..., output_type="np").images`.

    Args:
      prompt: one prompt or a list of B prompts.
      height, width: the image size; diffusers rounds it down to a multiple of
        2 * vae_scale_factor (16 for FLUX), and so do we.
      num_inference_steps: Euler steps.
      guidance_scale: the distilled guidance, used only when the transformer has guidance
        embeddings (FLUX.1-dev; flux.md §6).
      latents: diffusers' PACKED initial latents (B * n, N, 4C); drawn from `rng` when None.
      rng: a jax PRNG key, required when `latents` is None.
      num_images_per_prompt: n images per prompt, adjacent in the batch.

    Returns:
      (B * n, H', W', 3) float32 in [0, 1], H' x W' the rounded size.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
      raise ValueError("No prompts given.")
    factor = self.vae_scale_factor
    latent_height, latent_width = latent_size(height, width, factor)
    if latent_height == 0 or latent_width == 0:
      raise ValueError(f"{height}x{width} is smaller than one 2x2 patch of latents ({2 * factor})")
    if height % (2 * factor) or width % (2 * factor):
      logging.warning(
        "height %d and width %d are not multiples of %d; the image is %dx%d (as diffusers).",
        height,
        width,
        2 * factor,
        latent_height * factor,
        latent_width * factor,
      )
    prompt_embeds, pooled = self.encode_prompt(prompts, num_images_per_prompt)
    # diffusers keeps the latents in the prompt embeddings' dtype.
    latents = self.prepare_latents(
      len(prompts) * num_images_per_prompt,
      latent_height,
      latent_width,
      prompt_embeds.dtype,
      latents=latents,
      rng=rng,
    )
    # image_seq_len for mu is the number of packed tokens (flux.md §8).
    sigmas = self.schedule.sigmas(num_inference_steps, latents.shape[1])
    latents = self.denoise(
      latents, prompt_embeds, pooled, sigmas, latent_height, latent_width, guidance_scale
    )
    return self.decode(latents, latent_height, latent_width)
