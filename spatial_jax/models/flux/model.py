"""`FluxTransformer`: diffusers' `FluxTransformer2DModel` in Flax NNX.

Call convention as diffusers: packed latents (B, N, C), text states (B, T, joint_attention_dim),
pooled CLIP (B, pooled_projection_dim), `timestep` (and `guidance`) as sigma in [0, 1] (scaled by
1000 here), 2-D `img_ids` (N, 3) and `txt_ids` (T, 3). Returns (B, N, patch^2 * out_channels).

With `config.scan_layers` (the default) each block kind is one module whose parameters have a
leading layer axis (logical name "layers"), created with `nnx.vmap` and run with `nnx.scan`: one
block is traced and compiled however deep the model is.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_jax.models.common import linear
from spatial_jax.models.flux import layers
from spatial_jax.models.flux.blocks import FluxSingleTransformerBlock, FluxTransformerBlock
from spatial_jax.models.flux.config import FluxConfig
from spatial_jax.sharding import shard

_TOKENS = ("act_batch", "act_seq", "act_embed")


def _remat_policy(name: str) -> Callable[..., bool] | None:
  return {
    "full": None,  # Save nothing inside a block.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


def _stack(ctor: Callable[[nnx.Rngs], nnx.Module], n: int, scan: bool, rngs: nnx.Rngs):
  """n blocks: one module with a leading "layers" axis (scan) or an nnx.List."""
  if not scan or n == 0:
    return nnx.List([ctor(rngs) for _ in range(n)])
  keys = jax.random.split(rngs.params(), n)
  create = nnx.vmap(
    lambda key: ctor(nnx.Rngs(params=key)),
    in_axes=0,
    out_axes=0,
    transform_metadata={nnx.PARTITION_NAME: "layers"},
  )
  return create(keys)


def _rematted(step: Callable, policy: Callable[..., bool] | None) -> Callable:
  """`step` under jax.checkpoint. Blocks are pure in the forward pass (they change no state),
  so the block goes in as (graphdef, state) and nothing needs to flow back out."""

  def wrapped(block, carry, *broadcast):
    graphdef, state = nnx.split(block)

    def pure(state, carry, *broadcast):
      return step(nnx.merge(graphdef, state), carry, *broadcast)

    return jax.checkpoint(pure, policy=policy)(state, carry, *broadcast)

  return wrapped


def _run_blocks(blocks, carry, step: Callable, config: FluxConfig, *broadcast):
  """Applies `step(block, carry, *broadcast) -> carry` over the stack, scanned or looped."""
  if config.remat != "none":
    step = _rematted(step, _remat_policy(config.remat))
  if isinstance(blocks, nnx.List):
    for block in blocks:
      carry = step(block, carry, *broadcast)
    return carry
  scan = nnx.scan(
    step,
    in_axes=(0, nnx.Carry) + (None,) * len(broadcast),
    out_axes=nnx.Carry,
    transform_metadata={nnx.PARTITION_NAME: "layers"},
    graph=False,
  )
  return scan(blocks, carry, *broadcast)


def _double_step(block, carry, temb, cos, sin):
  x, c = carry
  return block(x, c, temb, cos, sin)


def _single_step(block, h, temb, cos, sin):
  return block(h, temb, cos, sin)


class FluxTransformer(nnx.Module):
  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
    self.config = config
    dim = config.inner_dim
    self.x_embedder = linear(config.in_channels, dim, (None, "embed"), config, rngs)
    self.context_embedder = linear(config.joint_attention_dim, dim, (None, "embed"), config, rngs)
    self.time_text_embed = layers.TimeTextEmbed(config, rngs=rngs)
    self.transformer_blocks = _stack(
      lambda r: FluxTransformerBlock(config, rngs=r), config.num_layers, config.scan_layers, rngs
    )
    self.single_transformer_blocks = _stack(
      lambda r: FluxSingleTransformerBlock(config, rngs=r),
      config.num_single_layers,
      config.scan_layers,
      rngs,
    )
    self.norm_out = layers.AdaLayerNormContinuous(config, rngs=rngs)
    self.proj_out = linear(dim, config.out_features, ("embed", None), config, rngs)

  def __call__(
    self,
    hidden_states: jax.Array,
    encoder_hidden_states: jax.Array,
    pooled_projections: jax.Array,
    timestep: jax.Array,
    img_ids: jax.Array,
    txt_ids: jax.Array,
    guidance: jax.Array | None = None,
  ) -> jax.Array:
    config = self.config
    dtype = jnp.dtype(config.dtype)
    if img_ids.ndim != 2 or txt_ids.ndim != 2:
      raise ValueError(
        f"img_ids {img_ids.shape} and txt_ids {txt_ids.shape} must be 2-D (tokens, 3), "
        "shared by the batch (diffusers' current convention)"
      )
    batch = hidden_states.shape[0]
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,)) * 1000
    if guidance is not None:
      guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (batch,)) * 1000
    temb = self.time_text_embed(timestep, guidance, pooled_projections.astype(dtype))

    x = shard(self.x_embedder(hidden_states.astype(dtype)), _TOKENS)
    c = shard(self.context_embedder(encoder_hidden_states.astype(dtype)), _TOKENS)
    cos, sin = layers.rope_cos_sin(
      jnp.concatenate([txt_ids, img_ids], axis=0), config.axes_dims_rope
    )

    x, c = _run_blocks(self.transformer_blocks, (x, c), _double_step, config, temb, cos, sin)
    h = jnp.concatenate([c, x], axis=1)
    h = _run_blocks(self.single_transformer_blocks, h, _single_step, config, temb, cos, sin)
    x = h[:, c.shape[1] :]
    return self.proj_out(self.norm_out(x, temb))
