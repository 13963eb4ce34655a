"""The SpatialScore head: hidden state at `<reward>` -> (mu, sigma) of a Gaussian score."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Keeps sigma away from 0, where the probit loss and the MC samples degenerate.
MIN_SIGMA = 1e-3


def fp32_dense(din: int, dout: int, names: tuple, *, rngs: nnx.Rngs) -> nnx.Linear:
  """A Linear kept and computed in fp32, its kernel sharded by the logical `names`."""
  return nnx.Linear(
    din,
    dout,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
    rngs=rngs,
  )


class RewardHead(nnx.Module):
  """MLP hidden -> head_hidden -> 2, kept and computed in fp32 (as HPSv3 keeps its head).

  Output channel 0 is mu; channel 1 goes through softplus (+ MIN_SIGMA) to give sigma.
  """

  def __init__(self, hidden_size: int, head_hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = fp32_dense(hidden_size, head_hidden, ("embed", None), rngs=rngs)
    self.fc2 = fp32_dense(head_hidden, 2, (None, None), rngs=rngs)

  def __call__(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = jax.nn.gelu(self.fc1(hidden.astype(jnp.float32)))
    out = self.fc2(h)
    mu = out[..., 0]
    sigma = jax.nn.softplus(out[..., 1]) + MIN_SIGMA
    return mu, sigma
