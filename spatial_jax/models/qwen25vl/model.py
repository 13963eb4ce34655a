"""Qwen2.5-VL for conditional generation: vision tower + splice + M-RoPE decoder + LM head.

Everything that depends on the *values* of `image_grid_thw` and `input_ids` (window
permutations, 3D rotary positions) is computed on the host with numpy by
`prepare_inputs`, so the jitted `forward` sees only arrays of static shape. The
convenience `__call__` does both steps and matches transformers' call signature.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from spatial_jax import sharding
from spatial_jax.models.common import linear
from spatial_jax.models.qwen25vl import rope_index, vision
from spatial_jax.models.qwen25vl.config import Qwen25VLConfig
from spatial_jax.models.qwen25vl.text import TextModel
from spatial_jax.models.qwen25vl.vision import VisionTransformer

# The language-model projections PEFT / the paper adapt by default.
DEFAULT_LORA_TARGETS = (
  r"language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
  r"language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
)


@struct.dataclass
class Qwen25VLOutput:
  logits: jax.Array | None
  last_hidden_state: jax.Array


@struct.dataclass
class ModelInputs:
  """Host-prepared, jit-ready inputs (a pytree of arrays)."""

  input_ids: jax.Array  # (B, L) int32
  attention_mask: jax.Array  # (B, L) int32, 1 = token, 0 = padding
  position_ids: jax.Array  # (3, B, L) int32: M-RoPE (temporal, height, width) rows
  pixel_values: jax.Array | None = None  # (num_patches, patch_dim)
  vision_meta: Any = None  # vision.VisionMetadata


class Qwen25VLModel(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration in NNX (attribute names follow transformers 5)."""

  def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.visual = VisionTransformer(config, rngs=rngs)
    self.language_model = TextModel(config, rngs=rngs)
    if not config.text.tie_word_embeddings:
      self.lm_head = linear(
        config.text.hidden_size,
        config.text.vocab_size,
        ("embed", "vocab"),
        config,
        rngs,
        use_bias=False,
        init_std=config.text.initializer_range,
      )

  # -- Host-side preparation -------------------------------------------------------------------

  def prepare_inputs(
    self,
    input_ids: Any,
    attention_mask: Any = None,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
  ) -> ModelInputs:
    """Computes positions and vision metadata on the host (values must be concrete)."""
    return prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw)

  # -- Forward ---------------------------------------------------------------------------------

  def embed_inputs(self, inputs: ModelInputs) -> jax.Array:
    """Token embeddings with the merged image features spliced in at the image-pad tokens."""
    embeds = self.language_model.embed(inputs.input_ids)
    if inputs.pixel_values is None:
      return embeds
    image_embeds = self.visual(inputs.pixel_values, inputs.vision_meta).astype(embeds.dtype)
    return splice_image_features(
      embeds, inputs.input_ids == self.config.image_token_id, image_embeds
    )

  def forward(self, inputs: ModelInputs, *, compute_logits: bool = True) -> Qwen25VLOutput:
    """The jit-friendly forward over host-prepared inputs."""
    embeds = self.embed_inputs(inputs)
    hidden = self.language_model(embeds, inputs.position_ids, inputs.attention_mask)
    logits = self.logits(hidden) if compute_logits else None
    return Qwen25VLOutput(logits=logits, last_hidden_state=hidden)

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.config.text.tie_word_embeddings:
      table = self.language_model.embed_tokens.embedding[...]
      out = jnp.einsum("bld,vd->blv", hidden, table.astype(hidden.dtype))
    else:
      out = self.lm_head(hidden)
    return sharding.shard(out, ("act_batch", "act_seq", "act_vocab"))

  def __call__(
    self,
    input_ids: Any,
    attention_mask: Any = None,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
  ) -> Qwen25VLOutput:
    """transformers' call convention; `image_grid_thw` and `input_ids` must be concrete."""
    return self.forward(
      self.prepare_inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
    )


def splice_image_features(
  embeds: jax.Array, image_mask: jax.Array, image_embeds: jax.Array
) -> jax.Array:
  """Places image features, in order, at the image-pad positions (masked_scatter, jit-friendly).

  The k-th True of `image_mask` (row-major) takes row k of `image_embeds`, as transformers'
  `masked_scatter` does; a cumulative count gives each position its row without dynamic shapes.
  """
  flat_mask = image_mask.reshape(-1)
  rows = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, image_embeds.shape[0] - 1)
  gathered = image_embeds[rows].reshape(embeds.shape)
  return jnp.where(image_mask[..., None], gathered, embeds)


def prepare_inputs(
  config: Qwen25VLConfig,
  input_ids: Any,
  attention_mask: Any = None,
  pixel_values: Any = None,
  image_grid_thw: Any = None,
) -> ModelInputs:
  """Host-side: 3D M-RoPE positions, vision metadata, and consistency checks."""
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  grid = None if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  num_image_tokens = int(((ids == config.image_token_id) & (mask == 1)).sum())
  meta = None
  if pixel_values is not None:
    if grid is None:
      raise ValueError("pixel_values given without image_grid_thw")
    patches = int(np.prod(grid, axis=-1).sum())
    if np.shape(pixel_values) != (patches, config.vision.patch_dim):
      raise ValueError(
        f"pixel_values shape {np.shape(pixel_values)} != ({patches}, {config.vision.patch_dim}) "
        f"for image_grid_thw {grid.tolist()}"
      )
    expected = patches // config.vision.merge_unit
    if num_image_tokens != expected:
      raise ValueError(
        f"input_ids hold {num_image_tokens} image tokens but the images give {expected} "
        "features: expand each image placeholder to grid_thw.prod() // merge_size**2 tokens"
      )
    meta = vision.vision_metadata(grid, config.vision)
  elif num_image_tokens:
    raise ValueError(f"input_ids hold {num_image_tokens} image tokens but no pixel_values")
  positions, _ = rope_index.rope_index(
    ids,
    grid if pixel_values is not None else None,
    mask,
    image_token_id=config.image_token_id,
    spatial_merge_size=config.vision.spatial_merge_size,
  )
  return ModelInputs(
    input_ids=jnp.asarray(ids, jnp.int32),
    attention_mask=jnp.asarray(mask, jnp.int32),
    position_ids=jnp.asarray(positions, jnp.int32),
    pixel_values=None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32),
    vision_meta=meta,
  )
