"""FLUX latent packing and position ids, as diffusers' FluxPipeline builds them (flux.md §6).

Our latents are NHWC. A packed token holds a 2x2 patch of latent pixels with feature index
`c * 4 + ph * 2 + pw` (diffusers' `_pack_latents` on NCHW; BFL's `b c (h ph) (w pw) -> b (h w)
(c ph pw)`), so packed tensors and the transformer's weights are interchangeable with diffusers.
"""

from __future__ import annotations

import jax
import numpy as np


def pack(latents: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, H/2 * W/2, 4C)."""
  b, h, w, c = latents.shape
  if h % 2 or w % 2:
    raise ValueError(f"Latent height and width must be even to pack 2x2 patches, got {h}x{w}")
  x = latents.reshape(b, h // 2, 2, w // 2, 2, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: jax.Array, height: int, width: int) -> jax.Array:
  """(B, H/2 * W/2, 4C) -> (B, H, W, C) for a latent grid of `height` x `width`."""
  b, n, f = tokens.shape
  if n != (height // 2) * (width // 2):
    raise ValueError(f"{n} tokens do not fill a {height}x{width} latent grid of 2x2 patches")
  x = tokens.reshape(b, height // 2, width // 2, f // 4, 2, 2)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, height, width, f // 4)


def image_ids(height: int, width: int) -> np.ndarray:
  """`_prepare_latent_image_ids` for a (height, width) grid of packed tokens: (h * w, 3) with
  axis 1 the row and axis 2 the column (axis 0, the index axis, is 0)."""
  ids = np.zeros((height, width, 3), np.float32)
  ids[..., 1] = np.arange(height)[:, None]
  ids[..., 2] = np.arange(width)[None, :]
  return ids.reshape(height * width, 3)


def text_ids(length: int) -> np.ndarray:
  """All-zero ids for `length` text tokens."""
  return np.zeros((length, 3), np.float32)


def latent_size(height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int]:
  """The latent grid for an image: `2 * (H // (2 * factor))` (diffusers rounds down so that the
  grid packs into 2x2 patches)."""
  return 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
