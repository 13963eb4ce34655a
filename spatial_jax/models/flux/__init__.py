"""FLUX.1 transformer in Flax NNX (diffusers names, diffusers / BFL checkpoints, LoRA)."""

from spatial_jax.models.flux.config import FluxConfig
from spatial_jax.models.flux.model import FluxTransformer
from spatial_jax.models.flux.params import from_pretrained

__all__ = ["FluxConfig", "FluxTransformer", "from_pretrained"]
