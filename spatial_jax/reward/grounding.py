"""Colour grounding: an auxiliary loss that teaches a from-scratch SpatialScore where things are.

A pretrained Qwen2.5-VL arrives able to ground words in the image; the synthetic world's tiny
model starts from random weights, and the Bradley-Terry signal alone is too weak to teach it:
the score learns to ignore the image before it learns to read it (README, SpatialScore). This
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


def centroid_loss(
  predicted: jax.Array,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  colour_ids: jax.Array,
  centroids: jax.Array,
  present: jax.Array,
) -> jax.Array:
  """Mean squared error (summed over x, y) of the predicted centroid at each colour word.

  Args:
    predicted: (N, L, 2) the grounding head at every position.
    input_ids, attention_mask: (N, L).
    colour_ids: (colours,) token id of each colour word.
    centroids, present: `colour_centroids` of each row's image.
  """
  is_colour = (input_ids[..., None] == colour_ids) & (attention_mask[..., None] > 0)  # (N, L, C)
  weight = (is_colour & present[:, None, :]).astype(jnp.float32)
  target = jnp.einsum("nlc,ncx->nlx", weight, centroids.astype(jnp.float32))
  per_token = jnp.sum((predicted.astype(jnp.float32) - target) ** 2, axis=-1)
  token_weight = weight.sum(-1)
  return jnp.sum(per_token * token_weight) / jnp.maximum(token_weight.sum(), 1.0)
