"""The SpatialScore head: hidden state at `<reward>` -> (mu, sigma) of a Gaussian score."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_jax.models.common import FP32, linear

# Keeps sigma away from 0, where the probit loss and the MC samples degenerate.
MIN_SIGMA = 1e-3


class RewardHead(nnx.Module):
  """MLP hidden -> head_hidden -> 2, kept and computed in fp32 (as HPSv3 keeps its head).

  Output channel 0 is mu; channel 1 goes through softplus (+ MIN_SIGMA) to give sigma.
  """

  def __init__(self, hidden_size: int, head_hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = linear(hidden_size, head_hidden, ("embed", None), FP32, rngs)
    self.fc2 = linear(head_hidden, 2, (None, None), FP32, rngs)

  def __call__(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = jax.nn.gelu(self.fc1(hidden.astype(jnp.float32)))
    out = self.fc2(h)
    mu = out[..., 0]
    sigma = jax.nn.softplus(out[..., 1]) + MIN_SIGMA
    return mu, sigma
