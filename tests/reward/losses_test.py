"""Reward losses against numpy references, and the pairwise accuracy metric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from spatial_jax.reward import losses

MU_W = np.array([1.2, -0.3, 0.5, 2.0], np.float32)
MU_L = np.array([0.1, 0.4, 0.5, -1.0], np.float32)
SIGMA_W = np.array([0.5, 1.0, 0.2, 2.0], np.float32)
SIGMA_L = np.array([0.3, 0.1, 0.2, 1.5], np.float32)


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def test_bt_loss_matches_numpy():
  got = losses.bt_loss(MU_W, SIGMA_W, MU_L, SIGMA_L)
  want = -np.mean(_np_log_sigmoid(MU_W.astype(np.float64) - MU_L))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_probit_loss_matches_scipy():
  got = losses.gaussian_probit_loss(MU_W, SIGMA_W, MU_L, SIGMA_L)
  z = (MU_W - MU_L) / np.sqrt(SIGMA_W.astype(np.float64) ** 2 + SIGMA_L**2)
  np.testing.assert_allclose(got, -np.mean(stats.norm.logcdf(z)), rtol=1e-5)


def test_gaussian_mc_loss_matches_quadrature():
  # E[-log sigmoid(z)], z ~ N(delta, s^2), by Gauss-Hermite quadrature in float64.
  nodes, weights = np.polynomial.hermite_e.hermegauss(80)
  delta = MU_W.astype(np.float64) - MU_L
  scale = np.sqrt(SIGMA_W.astype(np.float64) ** 2 + SIGMA_L**2)
  z = delta[:, None] + scale[:, None] * nodes[None]
  want = np.mean(-(_np_log_sigmoid(z) * weights).sum(1) / np.sqrt(2 * np.pi))
  got = losses.gaussian_mc_loss(
    MU_W, SIGMA_W, MU_L, SIGMA_L, key=jax.random.key(0), num_samples=200_000
  )
  np.testing.assert_allclose(got, want, rtol=3e-3)
  # With sigma -> 0 it reduces to Bradley-Terry on the means.
  tiny = np.full_like(SIGMA_W, 1e-6)
  np.testing.assert_allclose(
    losses.gaussian_mc_loss(MU_W, tiny, MU_L, tiny, key=jax.random.key(1)),
    losses.bt_loss(MU_W, tiny, MU_L, tiny),
    rtol=1e-5,
  )


def test_mc_loss_is_deterministic_per_key_and_differentiable_in_sigma():
  args = (MU_W, SIGMA_W, MU_L, SIGMA_L)
  a = losses.gaussian_mc_loss(*args, key=jax.random.key(3))
  b = losses.gaussian_mc_loss(*args, key=jax.random.key(3))
  assert float(a) == float(b)
  grad = jax.grad(lambda s: losses.gaussian_mc_loss(MU_W, s, MU_L, SIGMA_L, key=jax.random.key(3)))(
    jnp.asarray(SIGMA_W)
  )
  # For a confidently right pair (delta = 3), more uncertainty costs: d loss / d sigma > 0.
  assert grad[3] > 0


def test_pairwise_accuracy_on_a_hand_made_case():
  # Right, wrong, a tie (counted wrong), right.
  mu_w = np.array([1.0, 2.0, 0.0, 3.0])
  mu_l = np.array([0.0, 3.0, 0.0, 1.0])
  assert float(losses.pairwise_accuracy(mu_w, mu_l)) == 0.5


def test_unknown_loss_name():
  with pytest.raises(ValueError, match="Unknown reward loss 'hinge'"):
    losses.get_loss("hinge")
