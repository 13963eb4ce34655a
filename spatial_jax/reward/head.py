"""The SpatialScore head: hidden state at `<reward>` -> (mu, sigma) of a Gaussian score."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Keeps sigma away from 0, where the probit loss and the MC samples degenerate.
MIN_SIGMA = 1e-3


class RewardHead(nnx.Module):
  """MLP hidden -> head_hidden -> 2, kept and computed in fp32 (as HPSv3 keeps its head).

  Output channel 0 is mu; channel 1 goes through softplus (+ MIN_SIGMA) to give sigma.
  """

  def __init__(self, hidden_size: int, head_hidden: int, *, rngs: nnx.Rngs):
    def dense(din, dout, names):
      return nnx.Linear(
        din,
        dout,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        rngs=rngs,
      )

    self.fc1 = dense(hidden_size, head_hidden, ("embed", None))
    self.fc2 = dense(head_hidden, 2, (None, None))

  def __call__(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = jax.nn.gelu(self.fc1(hidden.astype(jnp.float32)))
    out = self.fc2(h)
    mu = out[..., 0]
    sigma = jax.nn.softplus(out[..., 1]) + MIN_SIGMA
    return mu, sigma
