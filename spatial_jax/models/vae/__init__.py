"""diffusers' AutoencoderKL (the FLUX VAE) in Flax NNX: NHWC, diffusers names and checkpoints."""

from spatial_jax.models.vae.config import VAEConfig
from spatial_jax.models.vae.model import (
  AutoencoderKL,
  DiagonalGaussian,
  scale_latents,
  unscale_latents,
)

__all__ = ["AutoencoderKL", "DiagonalGaussian", "VAEConfig", "scale_latents", "unscale_latents"]
