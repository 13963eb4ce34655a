"""Flow-GRPO's SDE step and the SDE sampler against an independent float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from spatial_jax.diffusion import sample_ode
from spatial_jax.diffusion.sde import SDETrajectory, sample_sde, sde_step_with_logprob

B, N, C = 3, 5, 4
SIGMAS = np.array([1.0, 0.9, 0.7, 0.45, 0.2, 0.0], np.float32)  # T = 5 steps, starts at 1
T = len(SIGMAS) - 1


def _reference_step(x, v, sigma, sigma_next, a, sigma_max, eps):
  """grpo.md §1.2 transcribed in float64, written independently of the JAX code."""
  x, v, eps = (np.asarray(t, np.float64) for t in (x, v, eps))
  dt = sigma_next - sigma
  std_t = a * np.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
  mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
  scale = std_t * np.sqrt(-dt)
  prev = mean + scale * eps
  log_prob = -((prev - mean) ** 2) / (2 * scale**2) - np.log(scale) - np.log(np.sqrt(2 * np.pi))
  return prev, log_prob.reshape(len(x), -1).mean(axis=1), mean, std_t


def _arrays(seed=0):
  rng = np.random.default_rng(seed)
  x, v, eps = (rng.standard_normal((B, N, C)).astype(np.float32) for _ in range(3))
  return x, v, eps


def _velocity(x, sigma):
  """A toy linear, sigma-dependent velocity (mixes channels so samples evolve differently)."""
  w = jnp.asarray(np.random.default_rng(7).standard_normal((C, C)) * 0.3, jnp.float32)
  return x @ w * (1 + sigma) - 0.5 * x


@pytest.mark.parametrize(
  "sigma,sigma_next,a,sigma_max",
  [(0.7, 0.45, 0.7, 0.9), (0.2, 0.0, 0.9, 0.9), (1.0, 0.9, 0.7, 0.9), (1.0, 0.8, 1.2, 0.8)],
)
def test_step_matches_numpy_reference(sigma, sigma_next, a, sigma_max):
  x, v, eps = _arrays()
  step = jax.jit(
    lambda x, v, s, sn, a, sm, e: sde_step_with_logprob(x, v, s, sn, a, sigma_max=sm, noise=e)
  )
  prev, log_prob, mean, std = step(x, v, sigma, sigma_next, a, sigma_max, eps)
  ref_prev, ref_log_prob, ref_mean, ref_std = _reference_step(
    x, v, sigma, sigma_next, a, sigma_max, eps
  )
  assert prev.dtype == log_prob.dtype == mean.dtype == jnp.float32
  assert log_prob.shape == (B,) and std.shape == ()
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(prev, ref_prev, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(std, ref_std, rtol=1e-6)
  np.testing.assert_allclose(log_prob, ref_log_prob, rtol=1e-5, atol=1e-5)


def test_sigma_one_guard():
  """At sigma == 1 the denominator is 1 - sigma_max: finite, and sigma_max=None means sigma_next."""
  x, v, eps = _arrays()
  guarded = sde_step_with_logprob(x, v, 1.0, 0.9, 0.7, sigma_max=0.9, noise=eps)
  default = sde_step_with_logprob(x, v, 1.0, 0.9, 0.7, noise=eps)
  other = sde_step_with_logprob(x, v, 1.0, 0.9, 0.7, sigma_max=0.8, noise=eps)
  np.testing.assert_allclose(guarded[3], 0.7 * np.sqrt(1 / 0.1), rtol=1e-5)
  np.testing.assert_allclose(other[3], 0.7 * np.sqrt(1 / 0.2), rtol=1e-5)
  for a, b in zip(guarded, default, strict=True):
    np.testing.assert_array_equal(a, b)
  assert all(np.isfinite(t).all() for t in guarded + other)
  # Away from sigma == 1, sigma_max is not read.
  np.testing.assert_array_equal(
    sde_step_with_logprob(x, v, 0.7, 0.45, 0.7, sigma_max=0.9, noise=eps)[0],
    sde_step_with_logprob(x, v, 0.7, 0.45, 0.7, sigma_max=0.1, noise=eps)[0],
  )


def test_scoring_reproduces_sampled_log_prob():
  """Training recomputes with prev_sample given; on-policy that must equal the sampled log_prob."""
  x, v, _ = _arrays()
  key = jax.random.key(3)
  for sigma, sigma_next in [(1.0, 0.9), (0.45, 0.2)]:
    prev, log_prob, mean, std = sde_step_with_logprob(
      x, v, sigma, sigma_next, 0.9, sigma_max=0.9, key=key
    )
    scored = sde_step_with_logprob(x, v, sigma, sigma_next, 0.9, sigma_max=0.9, prev_sample=prev)
    np.testing.assert_array_equal(scored[0], prev)
    np.testing.assert_allclose(scored[1], log_prob, rtol=1e-6)
    np.testing.assert_array_equal(scored[2], mean)
    np.testing.assert_array_equal(scored[3], std)
    # The key path draws jax.random.normal(key, shape) as eps.
    eps = jax.random.normal(key, x.shape, jnp.float32)
    np.testing.assert_array_equal(
      prev, sde_step_with_logprob(x, v, sigma, sigma_next, 0.9, sigma_max=0.9, noise=eps)[0]
    )


def test_log_prob_matches_scipy_norm():
  x, v, eps = _arrays(1)
  sigma, sigma_next, a = 0.45, 0.2, 0.7
  prev, log_prob, mean, std = sde_step_with_logprob(x, v, sigma, sigma_next, a, noise=eps)
  scale = float(std) * np.sqrt(sigma - sigma_next)
  expected = stats.norm.logpdf(np.asarray(prev, np.float64), np.asarray(mean, np.float64), scale)
  np.testing.assert_allclose(log_prob, expected.reshape(B, -1).mean(axis=1), rtol=1e-5)
  # Scoring a point other than the sampled one: still the Gaussian density around the mean.
  other = np.asarray(mean) + 0.3
  scored = sde_step_with_logprob(x, v, sigma, sigma_next, a, prev_sample=other)[1]
  expected = stats.norm.logpdf(other, np.asarray(mean, np.float64), scale)
  np.testing.assert_allclose(scored, expected.reshape(B, -1).mean(axis=1), rtol=1e-5)


def test_noise_level_zero_is_euler_step_with_zero_log_prob():
  x, v, eps = _arrays()
  step = jax.jit(lambda a: sde_step_with_logprob(x, v, 0.7, 0.45, a, noise=eps))
  prev, log_prob, mean, std = step(0.0)
  np.testing.assert_allclose(prev, x + (0.45 - 0.7) * v, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(prev, mean)
  np.testing.assert_array_equal(log_prob, np.zeros(B))
  assert std == 0
  # The guard keeps gradients finite (zero) through the point mass.
  grad = jax.grad(lambda v: sde_step_with_logprob(x, v, 0.7, 0.45, 0.0, prev_sample=x)[1].sum())(
    jnp.asarray(v)
  )
  np.testing.assert_array_equal(grad, np.zeros_like(v))


def test_log_prob_gradient_flows_through_mean_only():
  """d log_prob / d v is the Gaussian score through the mean; prev_sample is stop-gradiented."""
  x, v, eps = _arrays()
  sigma, sigma_next, a = 0.7, 0.45, 0.7

  def log_prob(v):
    return sde_step_with_logprob(x, v, sigma, sigma_next, a, noise=eps)[1].sum()

  grad = jax.grad(log_prob)(jnp.asarray(v))
  _, _, mean, std = sde_step_with_logprob(x, v, sigma, sigma_next, a, noise=eps)
  dt = sigma_next - sigma
  scale2 = float(std) ** 2 * -dt
  dmean_dv = (1 + float(std) ** 2 * (1 - sigma) / (2 * sigma)) * dt
  # prev - mean = scale * eps; d/dmean of -(prev - mean)^2 / (2 scale^2) = (prev - mean) / scale^2.
  expected = eps * np.sqrt(scale2) / scale2 * dmean_dv / (N * C)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_per_sample_sigmas_match_scalar_calls():
  x, v, eps = _arrays()
  sigma = np.array([1.0, 0.7, 0.2], np.float32)
  sigma_next = np.array([0.9, 0.45, 0.0], np.float32)
  prev, log_prob, mean, std = sde_step_with_logprob(
    x, v, sigma, sigma_next, 0.8, sigma_max=0.9, noise=eps
  )
  assert std.shape == (B, 1, 1)
  for b in range(B):
    one = sde_step_with_logprob(
      x[b : b + 1], v[b : b + 1], sigma[b], sigma_next[b], 0.8, sigma_max=0.9, noise=eps[b : b + 1]
    )
    np.testing.assert_allclose(prev[b], one[0][0], rtol=1e-6)
    np.testing.assert_allclose(log_prob[b], one[1][0], rtol=1e-6)
    np.testing.assert_allclose(std[b, 0, 0], one[3], rtol=1e-6)


def test_sampling_requires_exactly_one_noise_source():
  x, v, eps = _arrays()
  with pytest.raises(ValueError, match="exactly one"):
    sde_step_with_logprob(x, v, 0.7, 0.45, 0.7)
  with pytest.raises(ValueError, match="exactly one"):
    sde_step_with_logprob(x, v, 0.7, 0.45, 0.7, key=jax.random.key(0), noise=eps)


_sample = jax.jit(
  lambda x, key, a, window: sample_sde(_velocity, x, SIGMAS, key, noise_level=a, sde_window=window)
)
_sample_all = jax.jit(lambda x, key, a: sample_sde(_velocity, x, SIGMAS, key, noise_level=a))


def _noise():
  return jax.random.normal(jax.random.key(11), (B, N, C), jnp.float32)


def test_sampler_shapes_and_reference_trajectory():
  """Each recorded step is the reference step, scoring latents[j + 1] given latents[j]."""
  traj = _sample_all(_noise(), jax.random.key(0), 0.7)
  assert isinstance(traj, SDETrajectory)
  assert traj.latents.shape == (T + 1, B, N, C) and traj.latents.dtype == jnp.float32
  assert traj.log_probs.shape == (T, B) and traj.sigmas.shape == (T + 1,)
  assert traj.stochastic.dtype == jnp.bool_ and traj.stochastic.all()
  np.testing.assert_array_equal(traj.latents[0], _noise())
  np.testing.assert_array_equal(traj.sigmas, SIGMAS)
  for j in range(T):
    x, x_next = np.asarray(traj.latents[j]), np.asarray(traj.latents[j + 1])
    v = np.asarray(_velocity(x, SIGMAS[j]))
    # Recover eps from the recorded step, then compare the whole step with the float64 reference.
    _, _, ref_mean, ref_std = _reference_step(x, v, SIGMAS[j], SIGMAS[j + 1], 0.7, SIGMAS[1], x)
    eps = (x_next - ref_mean) / (ref_std * np.sqrt(SIGMAS[j] - SIGMAS[j + 1]))
    # The documented noise contract: step j draws normal(fold_in(key, j)) over the whole batch.
    expected_eps = jax.random.normal(jax.random.fold_in(jax.random.key(0), j), x.shape)
    np.testing.assert_allclose(eps, expected_eps, atol=1e-5)
    _, ref_log_prob, _, _ = _reference_step(x, v, SIGMAS[j], SIGMAS[j + 1], 0.7, SIGMAS[1], eps)
    np.testing.assert_allclose(traj.log_probs[j], ref_log_prob, rtol=1e-4, atol=1e-4)
    # The training-time recomputation documented in the module docstring.
    rescored = sde_step_with_logprob(
      x,
      _velocity(x, SIGMAS[j]),
      SIGMAS[j],
      SIGMAS[j + 1],
      0.7,
      sigma_max=traj.sigmas[1],
      prev_sample=traj.latents[j + 1],
    )[1]
    np.testing.assert_allclose(rescored, traj.log_probs[j], rtol=1e-5, atol=1e-5)


def test_sampler_noise_level_zero_is_sample_ode():
  x = _noise()
  traj = _sample_all(x, jax.random.key(0), 0.0)
  ode = jax.jit(lambda x: sample_ode(_velocity, x, SIGMAS))(x)
  np.testing.assert_allclose(traj.latents[-1], ode, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(traj.log_probs, np.zeros((T, B)))


def test_sampler_window():
  x = _noise()
  window = (jnp.int32(1), jnp.int32(3))  # traced bounds: one compile for every window
  a = _sample(x, jax.random.key(0), 0.9, window)
  b = _sample(x, jax.random.key(1), 0.9, window)
  np.testing.assert_array_equal(a.stochastic, [False, True, True, False, False])
  np.testing.assert_array_equal(a.log_probs[~np.asarray(a.stochastic)], 0)
  assert np.all(np.asarray(a.log_probs[1:3]) != 0)
  # Step 0 is the ODE step, so latents[1] does not depend on the key; the window's steps do.
  np.testing.assert_array_equal(a.latents[:2], b.latents[:2])
  assert not np.allclose(a.latents[2], b.latents[2])
  # Outside the window the step is the deterministic Euler step.
  ode_step = a.latents[3] + (SIGMAS[4] - SIGMAS[3]) * _velocity(a.latents[3], SIGMAS[3])
  np.testing.assert_allclose(a.latents[4], ode_step, rtol=1e-6, atol=1e-6)

  # An empty window: every step is ODE, the result is key-independent and equals sample_ode.
  empty = (jnp.int32(2), jnp.int32(2))
  c = _sample(x, jax.random.key(0), 0.9, empty)
  d = _sample(x, jax.random.key(5), 0.9, empty)
  assert not c.stochastic.any()
  np.testing.assert_array_equal(c.latents, d.latents)
  np.testing.assert_array_equal(c.log_probs, np.zeros((T, B)))
  np.testing.assert_allclose(c.latents[-1], sample_ode(_velocity, x, SIGMAS), rtol=1e-6, atol=1e-6)


def test_sampler_determinism_and_distinct_noise():
  x = _noise()
  a = _sample_all(x, jax.random.key(0), 0.7)
  b = _sample_all(x, jax.random.key(0), 0.7)
  c = _sample_all(x, jax.random.key(1), 0.7)
  for u, w in zip(a, b, strict=True):
    np.testing.assert_array_equal(u, w)
  assert not np.allclose(a.latents[-1], c.latents[-1])
  # The same start for every sample: the batch must still diverge (per-sample noise) ...
  same = jnp.broadcast_to(x[:1], x.shape)
  e = _sample_all(same, jax.random.key(0), 0.7)
  for i in range(B):
    for k in range(i):
      assert not np.allclose(e.latents[1, i], e.latents[1, k])
  # ... and each step draws fresh noise (eps of step 1 is not eps of step 0).
  eps = []
  for j in range(2):
    x_j = np.asarray(e.latents[j])
    _, _, mean, std = sde_step_with_logprob(
      x_j, _velocity(x_j, SIGMAS[j]), SIGMAS[j], SIGMAS[j + 1], 0.7, sigma_max=SIGMAS[1], noise=x_j
    )
    eps.append((e.latents[j + 1] - mean) / (std * np.sqrt(SIGMAS[j] - SIGMAS[j + 1])))
  assert not np.allclose(eps[0], eps[1], atol=1e-2)


def _reference_cps_step(x, v, sigma, sigma_next, a, eps):
  """FlowCPS (grpo.md §1.7) in float64, with the true Gaussian log-density."""
  x, v, eps = (np.asarray(t, np.float64) for t in (x, v, eps))
  scale = sigma_next * np.sin(a * np.pi / 2)
  mean = (1 - sigma_next) * (x - sigma * v) + np.sqrt(sigma_next**2 - scale**2) * (
    x + (1 - sigma) * v
  )
  prev = mean + scale * eps
  log_prob = -((prev - mean) ** 2) / (2 * scale**2) - np.log(scale) - np.log(np.sqrt(2 * np.pi))
  return prev, log_prob.reshape(len(x), -1).mean(axis=1), mean, scale


@pytest.mark.parametrize(
  "sigma,sigma_next,a", [(1.0, 0.9, 0.8), (0.7, 0.45, 0.5), (0.2, 0.05, 1.0)]
)
def test_cps_step_matches_numpy_reference(sigma, sigma_next, a):
  x, v, eps = _arrays(3)
  want_prev, want_lp, want_mean, scale = _reference_cps_step(x, v, sigma, sigma_next, a, eps)
  prev, log_prob, mean, std = sde_step_with_logprob(
    x, v, sigma, sigma_next, a, noise=jnp.asarray(eps), sde_type="cps"
  )
  np.testing.assert_allclose(prev, want_prev, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(log_prob, want_lp, rtol=1e-5, atol=1e-5)
  # `std` excludes sqrt(-dt), as the SDE step's: std * sqrt(-dt) is the step's std.
  np.testing.assert_allclose(std * np.sqrt(sigma - sigma_next), scale, rtol=1e-6)
  # Scoring the sampled latents gives the sampled log-prob back.
  _, scored, _, _ = sde_step_with_logprob(
    x, v, sigma, sigma_next, a, prev_sample=prev, sde_type="cps"
  )
  np.testing.assert_array_equal(scored, log_prob)


def test_cps_noise_level_zero_and_last_step_are_the_euler_step():
  x, v, _ = _arrays(4)
  for sigma, sigma_next, a in ((0.7, 0.45, 0.0), (0.2, 0.0, 0.8)):
    prev, log_prob, mean, _ = sde_step_with_logprob(
      x, v, sigma, sigma_next, a, key=jax.random.key(0), sde_type="cps"
    )
    np.testing.assert_allclose(mean, x + (sigma_next - sigma) * v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prev, mean, rtol=0, atol=0)
    assert not np.asarray(log_prob).any()
  with pytest.raises(ValueError, match="sde_type"):
    sde_step_with_logprob(x, v, 0.7, 0.45, 0.5, key=jax.random.key(0), sde_type="dance")


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_sampler_continued_from_a_later_step_is_the_same_trajectory(sde_type):
  """A trajectory continued from step s (`sigmas[s:]`, `step_offset=s`, the whole schedule's
  `sigma_max`) is the tail of the whole one: what a branching rollout relies on."""
  x = jnp.asarray(_arrays(5)[0])
  key = jax.random.key(3)
  kw = dict(noise_level=0.7, sde_type=sde_type, keep_means=True)
  whole = sample_sde(_velocity, x, SIGMAS, key, sde_window=(1, 4), **kw)
  s = 2
  tail = sample_sde(
    _velocity,
    whole.latents[s],
    SIGMAS[s:],
    key,
    sde_window=(1 - s, 4 - s),
    sigma_max=SIGMAS[1],
    step_offset=s,
    **kw,
  )
  np.testing.assert_allclose(tail.latents, whole.latents[s:], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(tail.log_probs, whole.log_probs[s:], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(tail.stochastic, whole.stochastic[s:])
  # The recorded means are each step's: latents[j + 1] = means[j] at ODE steps.
  assert whole.means.shape == (T, B, N, C)
  np.testing.assert_array_equal(whole.means[0], whole.latents[1])
  assert sample_sde(_velocity, x, SIGMAS, key, noise_level=0.7).means is None
