"""diffusers' AutoencoderKL (the FLUX VAE) in Flax NNX: NHWC, diffusers names and checkpoints."""

from spatial_jax.models.vae.config import VAEConfig
from spatial_jax.models.vae.model import (
  AutoencoderKL,
  DiagonalGaussian,
  scale_latents,
  unscale_latents,
)
from spatial_jax.models.vae.params import from_pretrained

__all__ = [
  "AutoencoderKL",
  "DiagonalGaussian",
  "VAEConfig",
  "from_pretrained",
  "scale_latents",
  "unscale_latents",
]
