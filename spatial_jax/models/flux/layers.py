"""FLUX building blocks: embeddings, RoPE, norms, attention, feed-forward (diffusers names).

Attribute names are diffusers' module names (`linear_1`, `norm_q`, `to_out.0`, `ff.net.0.proj`),
with `nnx.List` where diffusers uses a ModuleList, so checkpoint keys and PEFT module names map
1:1 (a torch `[out, in]` weight is our `[in, out]` kernel; flux.md §3, §15.1). Numerics follow
flux.md §4-5: RoPE and the timestep sinusoid in fp32, LayerNorm without affine and RMSNorm with
eps 1e-6, tanh GELU, text tokens first in joint attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_jax.models import attention as shared_attention
from spatial_jax.models.common import linear
from spatial_jax.models.flux.config import FluxConfig

ROPE_THETA = 10000.0
TIMESTEP_CHANNELS = 256
EPS = 1e-6


class Dropout(nnx.Module):
  """Holds the slot of diffusers' `Dropout(p=0)` in a ModuleList, so list indices match."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


# --- Timestep / guidance / pooled-text embedding ---------------------------------------------


def timestep_embedding(t: jax.Array, dim: int = TIMESTEP_CHANNELS) -> jax.Array:
  """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin], fp32."""
  half = dim // 2
  exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half
  angles = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class MLPEmbedder(nnx.Module):
  """`linear_2(silu(linear_1(x)))`: diffusers' TimestepEmbedding and PixArtAlphaTextProjection."""

  def __init__(self, in_features: int, config: FluxConfig, *, rngs: nnx.Rngs):
    self.linear_1 = linear(in_features, config.inner_dim, (None, "embed"), config, rngs)
    self.linear_2 = linear(config.inner_dim, config.inner_dim, ("embed", None), config, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
  """`CombinedTimestep(Guidance)TextProjEmbeddings`: temb = T(t) [+ G(g)] + P(pooled)."""

  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
    self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, config, rngs=rngs)
    if config.guidance_embeds:
      self.guidance_embedder = MLPEmbedder(TIMESTEP_CHANNELS, config, rngs=rngs)
    self.text_embedder = MLPEmbedder(config.pooled_projection_dim, config, rngs=rngs)
    self.guidance_embeds = config.guidance_embeds

  def __call__(self, timestep: jax.Array, guidance: jax.Array | None, pooled: jax.Array):
    dtype = pooled.dtype
    temb = self.timestep_embedder(timestep_embedding(timestep).astype(dtype))
    if self.guidance_embeds:
      if guidance is None:
        raise ValueError("This FLUX model has guidance embeddings: pass `guidance`.")
      temb = temb + self.guidance_embedder(timestep_embedding(guidance).astype(dtype))
    return temb + self.text_embedder(pooled)


# --- RoPE -------------------------------------------------------------------------------------


def rope_cos_sin(ids: jax.Array, axes_dims: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """`FluxPosEmbed`: (S, 3) position ids -> cos, sin of shape (S, sum(axes_dims)), fp32.

  Per axis, frequencies 1 / theta^(2j/d) times the id; each angle repeated twice
  (interleaved pairs, `repeat_interleave_real=True`), the axes concatenated.
  """
  pos = ids.astype(jnp.float32)
  cos, sin = [], []
  for axis, dim in enumerate(axes_dims):
    freqs = 1.0 / ROPE_THETA ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = pos[:, axis, None] * freqs[None, :]
    cos.append(jnp.repeat(jnp.cos(angles), 2, axis=-1))
    sin.append(jnp.repeat(jnp.sin(angles), 2, axis=-1))
  return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved (real, imag) pairs of x (B, S, N, D) in fp32; returns x's dtype."""
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
  return out.astype(x.dtype)


# --- Norms --------------------------------------------------------------------------------------


def layer_norm(x: jax.Array) -> jax.Array:
  """`nn.LayerNorm(elementwise_affine=False, eps=1e-6)`, statistics in fp32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + EPS)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """`torch.nn.RMSNorm(dim, eps=1e-6)` over the head dimension (QK norm), fp32 inside."""

  def __init__(self, dim: int, config: FluxConfig):
    self.weight = nnx.Param(
      nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))(
        jax.random.key(0), (dim,), jnp.dtype(config.param_dtype)
      )
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + EPS)
    return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """AdaLN: LayerNorm(x) * (1 + scale) + shift, with (B, D) shift/scale broadcast over tokens."""
  return layer_norm(x) * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLayerNormZero(nnx.Module):
  """Double-block modulation: six chunks (shift, scale, gate) x (attention, mlp) from temb."""

  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
    dim = config.inner_dim
    self.linear = linear(dim, 6 * dim, ("embed", None), config, rngs)

  def __call__(self, x: jax.Array, temb: jax.Array):
    chunks = jnp.split(self.linear(jax.nn.silu(temb)), 6, axis=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
    return modulate(x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nnx.Module):
  """Single-block modulation: (shift, scale, gate)."""

  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
    dim = config.inner_dim
    self.linear = linear(dim, 3 * dim, ("embed", None), config, rngs)

  def __call__(self, x: jax.Array, temb: jax.Array):
    shift, scale, gate = jnp.split(self.linear(jax.nn.silu(temb)), 3, axis=-1)
    return modulate(x, shift, scale), gate


class AdaLayerNormContinuous(nnx.Module):
  """`norm_out`: (scale, shift) in THIS order (BFL stores (shift, scale); flux.md §3)."""

  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
    dim = config.inner_dim
    self.linear = linear(dim, 2 * dim, ("embed", None), config, rngs)

  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    scale, shift = jnp.split(self.linear(jax.nn.silu(temb)).astype(x.dtype), 2, axis=-1)
    return modulate(x, shift, scale)


# --- Attention and feed-forward -------------------------------------------------------------------


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None) -> jax.Array:
  """Softmax attention over (B, S, N, D) with scale 1/sqrt(D), through the `attention_impl`
  (XLA, cuDNN, blockwise or the TPU kernel: `models/attention.py`)."""
  return shared_attention.attention(q, k, v, implementation=implementation)


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_tanh_parts(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  t = jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
  return 0.5 * x * (1 + t), t


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """`GELU(approximate="tanh")`, with a backward pass that reuses the forward's tanh.

  Same values and derivative as `jax.nn.gelu(x, approximate=True)`; XLA's CPU backend would
  otherwise recompute the tanh in several backward fusions (0.23 s of a 1.3 s LoRA step in
  benchmarks/flux_transformer.py).
  """
  return _gelu_tanh_parts(x)[0]


def _gelu_tanh_fwd(x):
  y, t = _gelu_tanh_parts(x)
  return y, (x, t)


def _gelu_tanh_bwd(residuals, grad):
  x, t = residuals
  inner = _GELU_C * (1 + 3 * 0.044715 * x * x)
  return (grad * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


class GELUProj(nnx.Module):
  """diffusers `GELU(dim, inner, approximate="tanh")`: gelu_tanh(proj(x))."""

  def __init__(self, dim: int, hidden: int, config: FluxConfig, *, rngs: nnx.Rngs):
    self.proj = linear(dim, hidden, ("embed", "mlp"), config, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return gelu_tanh(self.proj(x))


class FeedForward(nnx.Module):
  """diffusers `FeedForward(dim, activation_fn="gelu-approximate")`: net = [GELU, Dropout, Linear]."""

  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
    dim, hidden = config.inner_dim, config.mlp_hidden_dim
    self.net = nnx.List(
      [
        GELUProj(dim, hidden, config, rngs=rngs),
        Dropout(),
        linear(hidden, dim, ("mlp", "embed"), config, rngs),
      ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.net:
      x = layer(x)
    return x
