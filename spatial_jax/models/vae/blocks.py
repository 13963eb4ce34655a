"""VAE building blocks in NHWC: GroupNorm, ResnetBlock2D, mid-block attention, down/upsamplers.

Attribute names are diffusers' module names (`norm1`, `conv_shortcut`, `downsamplers.0.conv`,
`attentions.0.to_out.0`), with `nnx.List` where diffusers has a ModuleList, so a checkpoint key
is our path with `weight` -> `kernel` for convs and linears. Numerics follow diffusers 0.42.1
(`models/resnet.py`, `downsampling.py`, `upsampling.py`, `attention_processor.py`): GroupNorm
with eps 1e-6 and statistics in fp32, pre-norm resnets with an output scale of 1, a stride-2
conv after a (0, 1, 0, 1) zero pad, nearest x2 upsampling then a conv, and one-head attention
over all pixels with its softmax in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_jax.models.common import activation, linear
from spatial_jax.models.vae.config import VAEConfig
from spatial_jax.sharding import shard

EPS = 1e-6  # resnet_eps of every diffusers Encoder/Decoder block (vae.py).
# Activations between blocks: batch over data x fsdp, the rest whole (defaults).
IMAGE = ("act_batch", "act_hw", "act_hw", "act_channels")
KERNEL = ("kernel_hw", "kernel_hw", "conv_in", "conv_out")
# A conv that writes the image itself (3 channels) is replicated: 3 does not split over a
# tensor axis, and the layer is tiny.
IMAGE_KERNEL = ("kernel_hw", "kernel_hw", "conv_in", None)
# A linear over channels mixes them like a 1x1 conv (the deprecated attention block stored it
# as one), so it takes the conv channel names.
CHANNELS = ("conv_in", "conv_out")


def conv(
  in_features: int,
  out_features: int,
  config: VAEConfig,
  rngs: nnx.Rngs,
  *,
  kernel_size: int = 3,
  strides: int = 1,
  padding: int | tuple[tuple[int, int], tuple[int, int]] = 1,
  names: tuple[str | None, ...] = KERNEL,
) -> nnx.Conv:
  """A biased `nnx.Conv` (torch `Conv2d(in, out, k, stride, padding)`) with logical names."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nnx.Conv(
    in_features,
    out_features,
    kernel_size=(kernel_size, kernel_size),
    strides=(strides, strides),
    padding=padding,
    dtype=jnp.dtype(config.dtype),
    param_dtype=jnp.dtype(config.param_dtype),
    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[-1],)),
    rngs=rngs,
  )


class GroupNorm(nnx.Module):
  """`torch.nn.GroupNorm(groups, channels, eps=1e-6, affine=True)` over NHWC, fp32 inside.

  torch normalises each (example, group) over its channels and pixels with the biased variance;
  the statistics are taken in fp32 whatever the compute dtype, as torch does for bf16 on GPU.
  """

  def __init__(self, channels: int, groups: int, config: VAEConfig, eps: float = EPS):
    self.groups, self.eps = groups, eps
    param_dtype = jnp.dtype(config.param_dtype)
    key = jax.random.key(0)  # Constant inits: the key is unused.
    self.weight = nnx.Param(
      nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))(key, (channels,), param_dtype)
    )
    self.bias = nnx.Param(
      nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",))(key, (channels,), param_dtype)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    *lead, channels = x.shape
    x32 = x.astype(jnp.float32).reshape(*lead, self.groups, channels // self.groups)
    axes = tuple(range(1, len(lead))) + (x32.ndim - 1,)  # Pixels and the group's channels.
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    normed = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return out.astype(x.dtype)


class Dropout(nnx.Module):
  """The slot of diffusers' `Dropout(p=0)` in `to_out`, so `to_out.0` keeps its index."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


class ResnetBlock2D(nnx.Module):
  """diffusers `ResnetBlock2D` as the VAE builds it (no time embedding, pre-norm, scale 1).

  norm1 -> act -> conv1 -> norm2 -> act -> (dropout 0) -> conv2, plus the input, through a 1x1
  `conv_shortcut` when the channel count changes.
  """

  def __init__(self, in_channels: int, out_channels: int, config: VAEConfig, *, rngs: nnx.Rngs):
    groups = config.norm_num_groups
    self.act = activation(config.act_fn)
    self.norm1 = GroupNorm(in_channels, groups, config)
    self.conv1 = conv(in_channels, out_channels, config, rngs)
    self.norm2 = GroupNorm(out_channels, groups, config)
    self.conv2 = conv(out_channels, out_channels, config, rngs)
    if in_channels != out_channels:
      self.conv_shortcut = conv(in_channels, out_channels, config, rngs, kernel_size=1, padding=0)
    else:
      self.conv_shortcut = None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(self.act(self.norm1(x)))
    h = self.conv2(self.act(self.norm2(h)))
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return shortcut.astype(h.dtype) + h


class Attention(nnx.Module):
  """The mid block's `Attention(C, heads=1, dim_head=C, norm_num_groups=G, residual_connection,
  upcast_softmax)` with diffusers' `AttnProcessor2_0`: GroupNorm, then single-head attention over
  the H*W pixels with channel projections, plus the input (rescale_output_factor 1)."""

  def __init__(self, channels: int, config: VAEConfig, *, rngs: nnx.Rngs):
    self.group_norm = GroupNorm(channels, config.norm_num_groups, config)
    self.to_q = linear(channels, channels, CHANNELS, config, rngs)
    self.to_k = linear(channels, channels, CHANNELS, config, rngs)
    self.to_v = linear(channels, channels, CHANNELS, config, rngs)
    self.to_out = nnx.List([linear(channels, channels, CHANNELS, config, rngs), Dropout()])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, 1, c)  # One head of width C.
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    # Logits and softmax in fp32 in XLA's implementation (diffusers: upcast_softmax=True); the
    # scale is 1/sqrt(C), SDPA's default for a head of width C.
    out = jax.nn.dot_product_attention(q, k, v)
    out = self.to_out[0](out.reshape(b, h * w, c)).reshape(b, h, w, c)
    return out + x.astype(out.dtype)


class Downsample2D(nnx.Module):
  """`Downsample2D(C, use_conv=True, padding=0)`: diffusers zero-pads right and bottom by one
  (`F.pad(x, (0, 1, 0, 1))`) and applies a 3x3 stride-2 conv without padding; the same zeros
  as the conv's own asymmetric padding here."""

  def __init__(self, channels: int, config: VAEConfig, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, config, rngs, strides=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """`Upsample2D(C, use_conv=True)`: nearest-neighbour x2 (`F.interpolate(scale_factor=2)`,
  each pixel repeated 2x2), then a 3x3 conv."""

  def __init__(self, channels: int, config: VAEConfig, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, config, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):
  """`num_layers` resnets, then an optional downsampler (all levels but the last)."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    num_layers: int,
    add_downsample: bool,
    config: VAEConfig,
    *,
    rngs: nnx.Rngs,
  ):
    self.resnets = nnx.List(
      [
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, config, rngs=rngs)
        for i in range(num_layers)
      ]
    )
    self.downsamplers = (
      nnx.List([Downsample2D(out_channels, config, rngs=rngs)]) if add_downsample else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    for downsampler in self.downsamplers or ():
      x = downsampler(x)
    return shard(x, IMAGE)


class UpDecoderBlock2D(nnx.Module):
  """`num_layers` resnets (layers_per_block + 1 in the Decoder), then an optional upsampler."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    num_layers: int,
    add_upsample: bool,
    config: VAEConfig,
    *,
    rngs: nnx.Rngs,
  ):
    self.resnets = nnx.List(
      [
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, config, rngs=rngs)
        for i in range(num_layers)
      ]
    )
    self.upsamplers = (
      nnx.List([Upsample2D(out_channels, config, rngs=rngs)]) if add_upsample else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    for upsampler in self.upsamplers or ():
      x = upsampler(x)
    return shard(x, IMAGE)


class UNetMidBlock2D(nnx.Module):
  """resnet -> attention -> resnet at the lowest resolution (attention omitted when
  `mid_block_add_attention` is False; diffusers then holds `attentions = [None]`, no keys)."""

  def __init__(self, channels: int, config: VAEConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List(
      [ResnetBlock2D(channels, channels, config, rngs=rngs) for _ in range(2)]
    )
    self.attentions = (
      nnx.List([Attention(channels, config, rngs=rngs)]) if config.mid_block_add_attention else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return shard(self.resnets[1](x), IMAGE)
