"""`AutoencoderKL`: diffusers' KL VAE (`models/autoencoders/autoencoder_kl.py`) in Flax NNX.

diffusers dropped its Flax VAE (flux.md §13), and the last one (`FlaxAutoencoderKL`, v0.39) always
built the quant convs and had no `shift_factor`, so it could not hold the FLUX VAE (flux.md §7).
This port follows the PyTorch class in NHWC: images (B, H, W, in_channels) in [-1, 1], latents
(B, H / f, W / f, latent_channels) with f = `config.downsample_factor`. Tiling and slicing are
not ported.

The diffusion model sees scaled latents: `scale_latents` after `encode(...).mode()` / `.sample`,
and `unscale_latents` before `decode`, as the FLUX pipeline does (flux.md §6-7).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_jax.models.common import activation
from spatial_jax.models.vae import blocks
from spatial_jax.models.vae.config import VAEConfig
from spatial_jax.sharding import shard

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers DiagonalGaussianDistribution's clamp.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
  """diffusers `DiagonalGaussianDistribution`: the posterior q(z | x), NHWC.

  A pytree, so `encode` can be jitted. `logvar` is already clipped to [-30, 20].
  """

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """Splits the encoder's 2 * latent_channels output: the first half is the mean (torch
    `chunk(2, dim=1)` on NCHW is the last axis here)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    """mean + std * N(0, 1) in the mean's dtype (JAX noise: not torch's for the same seed)."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over each example's latent, as diffusers' `kl()`."""
    terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, self.mean.ndim)))


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
  """VAE latents -> the diffusion model's: (z - shift_factor) * scaling_factor (shift 0 when
  None). FLUX: (z - 0.1159) * 0.3611 (flux.md §7)."""
  return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
  """The inverse of `scale_latents`, applied before `decode` (flux.md §6)."""
  return z / config.scaling_factor + (config.shift_factor or 0.0)


class Encoder(nnx.Module):
  """diffusers `Encoder(double_z=True)`: conv_in, one DownEncoderBlock2D per level (downsampling
  but the last), the mid block, GroupNorm + act + conv_out to 2 * latent_channels."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    channels = config.block_out_channels
    self.act = activation(config.act_fn)
    self.conv_in = blocks.conv(config.in_channels, channels[0], config, rngs)
    self.down_blocks = nnx.List(
      [
        blocks.DownEncoderBlock2D(
          channels[max(i - 1, 0)],
          out,
          config.layers_per_block,
          add_downsample=i < len(channels) - 1,
          config=config,
          rngs=rngs,
        )
        for i, out in enumerate(channels)
      ]
    )
    self.mid_block = blocks.UNetMidBlock2D(channels[-1], config, rngs=rngs)
    self.conv_norm_out = blocks.GroupNorm(channels[-1], config.norm_num_groups, config)
    self.conv_out = blocks.conv(channels[-1], 2 * config.latent_channels, config, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """diffusers `Decoder(norm_type="group")`: conv_in, the mid block, one UpDecoderBlock2D per
  level from the widest (layers_per_block + 1 resnets, upsampling but the last), GroupNorm + act +
  conv_out to out_channels."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    channels = tuple(reversed(config.block_out_channels))
    self.act = activation(config.act_fn)
    self.conv_in = blocks.conv(config.latent_channels, channels[0], config, rngs)
    self.mid_block = blocks.UNetMidBlock2D(channels[0], config, rngs=rngs)
    self.up_blocks = nnx.List(
      [
        blocks.UpDecoderBlock2D(
          channels[max(i - 1, 0)],
          out,
          config.layers_per_block + 1,
          add_upsample=i < len(channels) - 1,
          config=config,
          rngs=rngs,
        )
        for i, out in enumerate(channels)
      ]
    )
    self.conv_norm_out = blocks.GroupNorm(channels[-1], config.norm_num_groups, config)
    self.conv_out = blocks.conv(
      channels[-1], config.out_channels, config, rngs, names=blocks.IMAGE_KERNEL
    )

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(self.act(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """diffusers `AutoencoderKL` in NHWC; parameter paths are diffusers' keys (`weight` of a conv
  or linear is our `kernel`).

  Usage (`from spatial_jax.models.vae import params`):
    vae = params.from_pretrained("FLUX.1-dev/vae", dtype="bfloat16")
    z = vae.scale_latents(vae.encode(images).mode())     # -> the transformer's latents
    images = vae.decode(vae.unscale_latents(z))           # in [-1, 1] (not clipped)
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)
    latent = config.latent_channels
    self.quant_conv = (
      blocks.conv(2 * latent, 2 * latent, config, rngs, kernel_size=1, padding=0)
      if config.use_quant_conv
      else None
    )
    self.post_quant_conv = (
      blocks.conv(latent, latent, config, rngs, kernel_size=1, padding=0)
      if config.use_post_quant_conv
      else None
    )

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """(B, H, W, in_channels) in [-1, 1] -> the posterior over (B, H/f, W/f, latent_channels),
    in the compute dtype."""
    moments = self.encoder(shard(images, blocks.IMAGE))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels),
    nominally in [-1, 1] and not clipped, in the compute dtype."""
    z = shard(latents, blocks.IMAGE)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(
    self, images: jax.Array, *, sample_posterior: bool = False, key: jax.Array | None = None
  ) -> jax.Array:
    """diffusers `forward`: decode(posterior sample if `sample_posterior` else its mode)."""
    posterior = self.encode(images)
    if sample_posterior:
      if key is None:
        raise ValueError("AutoencoderKL(sample_posterior=True) needs a PRNG `key`.")
      return self.decode(posterior.sample(key))
    return self.decode(posterior.mode())

  def scale_latents(self, z: jax.Array) -> jax.Array:
    return scale_latents(z, self.config)

  def unscale_latents(self, z: jax.Array) -> jax.Array:
    return unscale_latents(z, self.config)
