"""Helpers shared by the FLUX tests: tiny diffusers models, inputs, and torch <-> numpy."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxTransformer2DModel

# Two explicit tiny configs: with and without guidance embeddings, 2 + 3 and 1 + 2 blocks.
CONFIGS = {
  "guided": dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    guidance_embeds=True,
    axes_dims_rope=(4, 4, 8),
  ),
  "plain": dict(
    patch_size=1,
    in_channels=4,
    out_channels=None,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=False,
    axes_dims_rope=(2, 2, 4),
  ),
}


def torch_model(name: str, seed: int = 0) -> FluxTransformer2DModel:
  """A diffusers model with random weights; every bias and norm scale is random too, so a
  transposed or swapped tensor cannot go unnoticed."""
  torch.manual_seed(seed)
  model = FluxTransformer2DModel(**CONFIGS[name]).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] <= 16 else 0.0))
  return model


def image_ids(height: int, width: int) -> np.ndarray:
  """diffusers' `_prepare_latent_image_ids`: (h * w, 3) with row and column ids."""
  ids = np.zeros((height, width, 3), np.float32)
  ids[..., 1] = np.arange(height)[:, None]
  ids[..., 2] = np.arange(width)[None, :]
  return ids.reshape(-1, 3)


def inputs(name: str, *, batch: int = 2, grid=(3, 5), text_len: int = 7, seed: int = 0):
  """Random packed latents on a (non-square) grid, text of a non-power-of-two length."""
  cfg = CONFIGS[name]
  rng = np.random.default_rng(seed)
  n = grid[0] * grid[1]
  out = dict(
    hidden_states=rng.standard_normal((batch, n, cfg["in_channels"]), np.float32),
    encoder_hidden_states=rng.standard_normal(
      (batch, text_len, cfg["joint_attention_dim"]), np.float32
    ),
    pooled_projections=rng.standard_normal((batch, cfg["pooled_projection_dim"]), np.float32),
    timestep=rng.uniform(0, 1, (batch,)).astype(np.float32),
    img_ids=image_ids(*grid),
    txt_ids=np.zeros((text_len, 3), np.float32),
  )
  if cfg["guidance_embeds"]:
    out["guidance"] = np.full((batch,), 3.5, np.float32)
  return out


def torch_forward(model, batch: dict[str, np.ndarray]) -> np.ndarray:
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v) for k, v in batch.items()}, return_dict=False)[0]
  return out.numpy()
