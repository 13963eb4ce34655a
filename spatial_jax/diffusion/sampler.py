"""The Euler ODE sampler of flow matching, as one `lax.scan` (one compile for all steps)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# velocity(latents, sigma) -> velocity, both packed (B, N, C); sigma a scalar in [0, 1].
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def euler_step(sample: jax.Array, velocity: jax.Array, sigma, sigma_next) -> jax.Array:
  """FlowMatchEulerDiscreteScheduler.step: x + (sigma_next - sigma) * v in fp32, returned in the
  velocity's dtype (as diffusers casts it)."""
  step = sample.astype(jnp.float32) + (sigma_next - sigma) * velocity.astype(jnp.float32)
  return step.astype(velocity.dtype)


def sample_ode(velocity: VelocityFn, latents: jax.Array, sigmas: jax.Array) -> jax.Array:
  """Integrates from sigmas[0] to sigmas[-1] with len(sigmas) - 1 Euler steps."""
  sigmas = jnp.asarray(sigmas, jnp.float32)

  def body(x, pair):
    sigma, sigma_next = pair
    return euler_step(x, velocity(x, sigma), sigma, sigma_next), None

  out, _ = jax.lax.scan(body, latents, (sigmas[:-1], sigmas[1:]))
  return out
