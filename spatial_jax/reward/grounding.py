"""Colour grounding: an auxiliary loss that teaches a from-scratch SpatialScore where things are.

A pretrained Qwen2.5-VL arrives able to ground words in the image; the synthetic world's tiny
model starts from random weights, and the Bradley-Terry signal alone is too weak to teach it:
the score learns to ignore the image before it learns to read it (docs/results/spatialscore_synthetic.md). This
loss gives the decoder the missing skill directly. At every colour word of the prompt (colours
are distinct within a synthetic scene, so a colour names one object) the last hidden state
predicts, through a linear `grounding_head`, the centroid of that colour's pixels in the image.
The targets come from the image itself (the oracle's palette test), so any synthetic pairs
folder serves; the head is used in training only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spatial_jax.data import oracle, scenes

COLOURS: tuple[str, ...] = tuple(scenes.COLORS)


def colour_token_ids(tokenizer: Any) -> np.ndarray:
  """Token id of each palette colour word, in `scenes.COLORS` order (int32, (colours,))."""
  ids = [tokenizer.convert_tokens_to_ids(colour) for colour in COLOURS]
  unknown = [
    c for c, i in zip(COLOURS, ids, strict=True) if i is None or i == tokenizer.unk_token_id
  ]
  if unknown:
    raise ValueError(
      f"The colour-grounding loss (config.train.grounding_weight) needs one token per colour "
      f"word, as the synthetic tokenizer has; this tokenizer has none for {unknown}."
    )
  return np.asarray(ids, np.int32)


def colour_centroids(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Centroids of each palette colour in uint8 images (N, H, W, 3).

  Returns:
    centroids: float32 (N, colours, 2), (x, y) in [-1, 1] (pixel centres; 0 where absent).
    present: bool (N, colours), whether any pixel has that colour.
  """
  images = np.asarray(images)
  labels = oracle.color_labels(images)  # (N, H, W), -1 for background
  onehot = labels[..., None] == np.arange(len(COLOURS))  # (N, H, W, colours)
  counts = onehot.sum(axis=(1, 2))
  height, width = labels.shape[1:]
  ys = (np.arange(height) + 0.5) / height * 2 - 1
  xs = (np.arange(width) + 0.5) / width * 2 - 1
  safe = np.maximum(counts, 1)
  cx = np.einsum("nhwc,w->nc", onehot, xs) / safe
  cy = np.einsum("nhwc,h->nc", onehot, ys) / safe
  return np.stack([cx, cy], axis=-1).astype(np.float32), counts > 0


def centroid_axis_errors(
  predicted: jax.Array,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  colour_ids: jax.Array,
  centroids: jax.Array,
  present: jax.Array,
) -> jax.Array:
  """Mean squared error of the predicted centroid at each colour word, per axis: (2,) = (x, y).

  Args:
    predicted: (N, L, 2) the grounding head at every position.
    input_ids, attention_mask: (N, L).
    colour_ids: (colours,) token id of each colour word.
    centroids, present: `colour_centroids` of each row's image.
  """
  is_colour = (input_ids[..., None] == colour_ids) & (attention_mask[..., None] > 0)  # (N, L, C)
  weight = (is_colour & present[:, None, :]).astype(jnp.float32)
  target = jnp.einsum("nlc,ncx->nlx", weight, centroids.astype(jnp.float32))
  squared = (predicted.astype(jnp.float32) - target) ** 2  # (N, L, 2)
  token_weight = weight.sum(-1)
  return jnp.einsum("nlx,nl->x", squared, token_weight) / jnp.maximum(token_weight.sum(), 1.0)


def centroid_loss(*args: jax.Array) -> jax.Array:
  """The grounding loss: `centroid_axis_errors` summed over x and y (same arguments)."""
  return jnp.sum(centroid_axis_errors(*args))


def image_token_places(input_ids: jax.Array, image_token_id: int, grid: tuple[int, int]):
  """Where each image token of the sequences sits in its image.

  The decoder's image tokens are the merged patches in row-major order, `grid` = (rows,
  columns) of them per image (every image of a synthetic batch has the same size).

  Returns:
    places: float32 (N, L, 2), the (x, y) of each image token's centre in [-1, 1] (0 elsewhere).
    is_image: bool (N, L).
  """
  rows, cols = grid
  is_image = input_ids == image_token_id
  index = jnp.cumsum(is_image, axis=-1) - 1  # Each image token's index within its image.
  x = ((index % cols) + 0.5) / cols * 2 - 1
  y = ((index // cols) % rows + 0.5) / rows * 2 - 1
  places = jnp.stack([x, y], axis=-1) * is_image[..., None]
  return places.astype(jnp.float32), is_image


def image_place_loss(
  predicted: jax.Array, input_ids: jax.Array, image_token_id: int, grid: tuple[int, int]
) -> jax.Array:
  """Mean squared error (summed over x, y) of each image token's predicted own place.

  The second half of grounding: `centroid_loss` asks a colour word where its object is, and
  this asks every image token, through the same head, where it is itself. A model trained from
  scratch has no absolute positions in its image tokens (Qwen2.5-VL's vision tower has only
  relative 2D RoPE), so a colour word attending to its object's tokens has no place to read
  from until this is learned; with one head for both, the place a colour word reports and the
  place an image token carries live in the same directions of the hidden state.
  """
  places, is_image = image_token_places(input_ids, image_token_id, grid)
  squared = jnp.sum((predicted.astype(jnp.float32) - places) ** 2, axis=-1)
  weight = is_image.astype(jnp.float32)
  return jnp.sum(squared * weight) / jnp.maximum(weight.sum(), 1.0)
