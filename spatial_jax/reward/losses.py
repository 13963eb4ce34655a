"""Pairwise preference losses for a Gaussian reward s ~ N(mu, sigma^2), all in fp32.

Notation: w = chosen (preferred), l = rejected; delta = mu_w - mu_l and
s^2 = sigma_w^2 + sigma_l^2 (qwen25vl_reward.md §4.6).

- `bt`: Bradley-Terry on the means, -log sigmoid(delta) (sigma unused).
- `gaussian_mc`: the paper's Gaussian BT as HPSv3 implements it (§4.1): reparameterised
  samples z = delta + s * eps, loss = -mean log sigmoid(z). The default.
- `gaussian_probit`: the closed form P(w > l) = Phi(delta / s), loss = -log Phi(delta / s).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# HPSv3 draws 1000 samples per pair; 64 keep the estimator's noise far below the
# batch-to-batch noise at a fraction of the memory (samples are per pair, not per token).
DEFAULT_MC_SAMPLES = 64


def _f32(*xs: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def bt_loss(mu_w, sigma_w, mu_l, sigma_l, *, key=None, num_samples=None) -> jax.Array:
  """Mean over pairs of -log sigmoid(mu_w - mu_l)."""
  del sigma_w, sigma_l, key, num_samples
  mu_w, mu_l = _f32(mu_w, mu_l)
  return -jnp.mean(jax.nn.log_sigmoid(mu_w - mu_l))


def gaussian_mc_loss(
  mu_w, sigma_w, mu_l, sigma_l, *, key: jax.Array, num_samples: int | None = None
) -> jax.Array:
  """Mean over pairs and samples of -log sigmoid(delta + s * eps), eps ~ N(0, 1)."""
  mu_w, sigma_w, mu_l, sigma_l = _f32(mu_w, sigma_w, mu_l, sigma_l)
  delta = mu_w - mu_l
  scale = jnp.sqrt(jnp.square(sigma_w) + jnp.square(sigma_l))
  eps = jax.random.normal(key, delta.shape + (num_samples or DEFAULT_MC_SAMPLES,), jnp.float32)
  return -jnp.mean(jax.nn.log_sigmoid(delta[..., None] + scale[..., None] * eps))


def gaussian_probit_loss(mu_w, sigma_w, mu_l, sigma_l, *, key=None, num_samples=None) -> jax.Array:
  """Mean over pairs of -log Phi(delta / s)."""
  del key, num_samples
  mu_w, sigma_w, mu_l, sigma_l = _f32(mu_w, sigma_w, mu_l, sigma_l)
  scale = jnp.sqrt(jnp.square(sigma_w) + jnp.square(sigma_l))
  return -jnp.mean(jax.scipy.stats.norm.logcdf((mu_w - mu_l) / scale))


LOSSES: dict[str, Callable[..., jax.Array]] = {
  "bt": bt_loss,
  "gaussian_mc": gaussian_mc_loss,
  "gaussian_probit": gaussian_probit_loss,
}


def get_loss(name: str) -> Callable[..., jax.Array]:
  if name not in LOSSES:
    raise ValueError(f"Unknown reward loss {name!r} (config.loss); known: {sorted(LOSSES)}")
  return LOSSES[name]


def pairwise_accuracy(mu_w: jax.Array, mu_l: jax.Array) -> jax.Array:
  """Fraction of pairs whose chosen image scores strictly higher (ties count as wrong)."""
  return jnp.mean((jnp.asarray(mu_w) > jnp.asarray(mu_l)).astype(jnp.float32))
