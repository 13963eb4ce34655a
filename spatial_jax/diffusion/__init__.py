"""Flow-matching diffusion for FLUX: schedule, latent packing, samplers (and the pipeline)."""

from spatial_jax.diffusion.latents import image_ids, latent_size, pack, text_ids, unpack
from spatial_jax.diffusion.pipeline import FluxPipeline
from spatial_jax.diffusion.sampler import euler_step, sample_ode
from spatial_jax.diffusion.schedule import FlowMatchSchedule, calculate_shift

__all__ = [
  "FlowMatchSchedule",
  "FluxPipeline",
  "calculate_shift",
  "euler_step",
  "image_ids",
  "latent_size",
  "pack",
  "sample_ode",
  "text_ids",
  "unpack",
]
