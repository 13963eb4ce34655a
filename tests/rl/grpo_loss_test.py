"""The GRPO loss, KL and metrics against numpy (grpo.md §1.2, §1.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatial_jax.rl import grpo

CLIP = 1e-2
B = 16


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  old = rng.normal(size=B).astype(np.float32)
  # Log-ratios of +-3 * CLIP, so both clip branches and the unclipped one occur.
  log_prob = old + rng.uniform(-3 * CLIP, 3 * CLIP, size=B).astype(np.float32)
  advantages = rng.normal(size=B).astype(np.float32)
  mask = rng.uniform(size=B) < 0.6
  mask[:2] = [True, False]
  mean = rng.normal(size=(B, 4, 3)).astype(np.float32)
  ref_mean = mean + 0.1 * rng.normal(size=(B, 4, 3)).astype(np.float32)
  std = rng.uniform(0.5, 1.5, size=B).astype(np.float32)
  dt = np.float32(-1 / 6)
  return log_prob, old, advantages, mask, mean, ref_mean, std, dt


def _np_policy(log_prob, old, adv, clip):
  ratio = np.exp(np.float64(log_prob) - old)
  return np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip)), ratio


def test_clipped_policy_loss_matches_numpy():
  log_prob, old, adv, *_ = _inputs()
  want, _ = _np_policy(log_prob, old, adv, CLIP)
  got = grpo.clipped_policy_loss(log_prob, old, adv, CLIP)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["exact", "flow_grpo"])
def test_grpo_loss_and_metrics_match_numpy(form):
  log_prob, old, adv, mask, mean, ref_mean, std, dt = _inputs(1)
  beta = 0.04
  loss, metrics = grpo.grpo_loss(
    log_prob,
    old,
    adv,
    mask,
    clip_range=CLIP,
    beta=beta,
    mean=mean,
    ref_mean=ref_mean,
    std=std,
    dt=dt,
    kl_form=form,
  )
  policy, ratio = _np_policy(log_prob, old, adv, CLIP)
  var = np.float64(std) ** 2 * (abs(dt) if form == "exact" else 1.0)
  kl = ((np.float64(mean) - ref_mean) ** 2).mean(axis=(1, 2)) / (2 * var)
  m = mask
  np.testing.assert_allclose(loss, np.mean(policy[m] + beta * kl[m]), rtol=1e-5, atol=1e-7)
  want = {
    "policy_loss": policy[m].mean(),
    "kl": kl[m].mean(),
    "clipfrac": np.mean(np.abs(ratio[m] - 1) > CLIP),
    "approx_kl": 0.5 * np.mean((np.float64(log_prob[m]) - old[m]) ** 2),
    "ratio_mean": ratio[m].mean(),
    "ratio_min": ratio[m].min(),
    "ratio_max": ratio[m].max(),
    "kept_fraction": m.mean(),
  }
  assert set(metrics) == set(want)
  assert 0 < want["clipfrac"] < 1
  for name, value in want.items():
    assert metrics[name].dtype == jnp.float32 and metrics[name].shape == ()
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_on_policy_ratio_is_exactly_one():
  _, old, adv, mask, *_ = _inputs(2)
  loss, metrics = grpo.grpo_loss(old, old, adv, mask, clip_range=1e-4)
  np.testing.assert_allclose(loss, -adv[mask].mean(), rtol=1e-6)
  assert float(metrics["clipfrac"]) == 0.0
  assert float(metrics["approx_kl"]) == 0.0
  for name in ("ratio_mean", "ratio_min", "ratio_max"):
    assert float(metrics[name]) == 1.0, name
  assert float(metrics["kl"]) == 0.0


def test_clip_branch_has_zero_gradient():
  old = jnp.zeros(4)
  # r = e^0.1 > 1 + eps with A > 0, r = e^-0.1 < 1 - eps with A < 0: both clipped.
  # The last two sit inside the trust region, where d/dlogp of -A r is -A r.
  log_prob = jnp.array([0.1, -0.1, 1e-3, -1e-3])
  adv = jnp.array([2.0, -3.0, 2.0, -3.0])
  mask = jnp.ones(4, bool)
  grad = jax.grad(lambda lp: grpo.grpo_loss(lp, old, adv, mask, clip_range=0.01)[0])(log_prob)
  want = np.array([0.0, 0.0, -2.0 * np.exp(1e-3), 3.0 * np.exp(-1e-3)]) / 4
  np.testing.assert_allclose(grad, want, rtol=1e-6)
  # The unfavourable side is not clipped: A > 0 with r < 1 - eps keeps its gradient.
  grad = jax.grad(lambda lp: grpo.clipped_policy_loss(lp, 0.0, 2.0, 0.01))(-0.1)
  np.testing.assert_allclose(grad, -2.0 * np.exp(-0.1), rtol=1e-6)


@pytest.mark.parametrize("form", ["exact", "flow_grpo"])
def test_kl_is_zero_for_equal_means(form):
  _, _, _, _, mean, _, std, dt = _inputs(3)
  kl = grpo.kl_to_reference(mean, mean, std, dt, form=form)
  assert kl.shape == (B,)
  np.testing.assert_array_equal(kl, np.zeros(B))


def test_exact_kl_is_the_gaussian_kl():
  _, _, _, _, mean, ref_mean, std, _ = _inputs(4)
  dt = np.float32(-0.13)
  # KL(N(m1, s^2) || N(m2, s^2)) per element by the general two-Gaussian formula, then the mean
  # over the element axes, as the log-prob is a mean.
  s = (np.float64(std) * np.sqrt(-dt))[:, None, None]
  m1, m2 = np.float64(mean), np.float64(ref_mean)
  per_element = np.log(s / s) + (s**2 + (m1 - m2) ** 2) / (2 * s**2) - 0.5
  want = per_element.mean(axis=(1, 2))
  for std_shape in [(B,), (B, 1, 1)]:
    got = grpo.kl_to_reference(mean, ref_mean, std.reshape(std_shape), dt)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # Flow-GRPO's form drops |dt| from the variance, so it is |dt| times smaller.
  flow = grpo.kl_to_reference(mean, ref_mean, std, form="flow_grpo")
  np.testing.assert_allclose(flow, 0.13 * want, rtol=1e-5)


def test_kl_gradient_flows_only_into_the_policy_mean():
  _, _, _, _, mean, ref_mean, std, dt = _inputs(5)
  g_mean, g_ref = jax.grad(lambda a, b: grpo.kl_to_reference(a, b, std, dt).sum(), (0, 1))(
    mean, ref_mean
  )
  want = (mean - ref_mean) / (std[:, None, None] ** 2 * abs(dt) * 12)
  np.testing.assert_allclose(g_mean, want, rtol=1e-4)
  np.testing.assert_array_equal(g_ref, np.zeros_like(ref_mean))


def test_dropped_samples_do_not_change_loss_or_gradient():
  log_prob, old, adv, mask, mean, ref_mean, std, dt = _inputs(6)
  kwargs = dict(clip_range=CLIP, beta=0.01, std=std, dt=dt)

  def run(lp, mu):
    return jax.value_and_grad(
      lambda lp, mu: grpo.grpo_loss(lp, old, adv, mask, mean=mu, ref_mean=ref_mean, **kwargs)[0],
      (0, 1),
    )(lp, mu)

  loss, (g_lp, g_mu) = run(log_prob, mean)
  # Garbage, including NaN and inf, in the dropped samples changes nothing.
  lp2 = np.where(mask, log_prob, np.float32(np.nan)).astype(np.float32)
  lp2[~mask & (np.arange(B) % 2 == 0)] = 1e4
  mu2 = np.where(mask[:, None, None], mean, np.float32(np.inf)).astype(np.float32)
  loss2, (g_lp2, g_mu2) = run(lp2, mu2)
  np.testing.assert_array_equal(loss2, loss)
  np.testing.assert_array_equal(g_lp2, g_lp)
  np.testing.assert_array_equal(g_mu2, g_mu)
  assert np.all(np.asarray(g_lp)[~mask] == 0) and np.any(np.asarray(g_lp)[mask] != 0)


def test_empty_mask_is_finite():
  log_prob, old, adv, _, mean, ref_mean, std, dt = _inputs(7)
  mask = np.zeros(B, bool)

  def f(lp):
    return grpo.grpo_loss(
      lp, old, adv, mask, clip_range=CLIP, beta=0.01, mean=mean, ref_mean=ref_mean, std=std, dt=dt
    )

  loss, metrics = f(log_prob)
  assert float(loss) == 0.0
  for name, value in metrics.items():
    assert np.isfinite(value), name
    assert float(value) == 0.0, name
  grad = jax.grad(lambda lp: f(lp)[0])(log_prob)
  np.testing.assert_array_equal(grad, np.zeros(B))


def test_beta_zero_needs_no_reference_and_kl_argument_errors():
  log_prob, old, adv, mask, mean, ref_mean, std, _ = _inputs(8)
  loss, metrics = grpo.grpo_loss(log_prob, old, adv, mask, clip_range=CLIP)
  assert float(metrics["kl"]) == 0.0
  np.testing.assert_allclose(loss, metrics["policy_loss"])
  with pytest.raises(ValueError, match="mean, ref_mean and std"):
    grpo.grpo_loss(log_prob, old, adv, mask, clip_range=CLIP, beta=0.1)
  with pytest.raises(ValueError, match="needs dt"):
    grpo.grpo_loss(
      log_prob, old, adv, mask, clip_range=CLIP, beta=0.1, mean=mean, ref_mean=ref_mean, std=std
    )
  with pytest.raises(ValueError, match="beta"):
    grpo.grpo_loss(log_prob, old, adv, mask, clip_range=CLIP, beta=-1.0)
  with pytest.raises(ValueError, match="form"):
    grpo.kl_to_reference(mean, ref_mean, std, -0.1, form="pref_grpo")


def test_jit_with_traced_beta_matches_eager():
  log_prob, old, adv, mask, mean, ref_mean, std, dt = _inputs(9)
  args = (log_prob, old, adv, mask)
  kw = dict(mean=mean, ref_mean=ref_mean, std=std, dt=dt)
  fn = jax.jit(lambda beta, *a: grpo.grpo_loss(*a, clip_range=CLIP, beta=beta, **kw))
  loss, metrics = fn(jnp.float32(0.02), *args)
  want_loss, want_metrics = grpo.grpo_loss(*args, clip_range=CLIP, beta=0.02, **kw)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for name in want_metrics:
    np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-6, err_msg=name)


def test_bf16_inputs_compute_in_float32():
  log_prob, old, adv, mask, *_ = _inputs(10)
  loss, metrics = grpo.grpo_loss(
    jnp.asarray(log_prob, jnp.bfloat16), old, adv, mask, clip_range=CLIP
  )
  assert loss.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in metrics.values())


def test_reward_metrics():
  rewards = np.random.default_rng(11).normal(size=(3, 8))
  mask = np.zeros((3, 8), bool)
  mask[:, [0, 2, 7]] = True
  got = grpo.reward_metrics(rewards, mask)
  np.testing.assert_allclose(got["reward_mean"], rewards.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["reward_std"], rewards.std(), rtol=1e-5)
  np.testing.assert_allclose(got["reward_kept_mean"], rewards[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(got["reward_kept_std"], rewards[mask].std(), rtol=1e-5)
  empty = grpo.reward_metrics(rewards, np.zeros_like(mask))
  assert float(empty["reward_kept_mean"]) == 0.0 and float(empty["reward_kept_std"]) == 0.0


def _np_normalized_log_ratio(log_prob, old, mean, old_mean, std, dt):
  scale = np.float64(std) * np.sqrt(abs(dt))
  bias = ((np.float64(mean) - old_mean) ** 2).mean(axis=(1, 2)) / (2 * scale**2)
  return (np.float64(log_prob) - old + bias) * scale


def test_ratio_norm_matches_numpy_and_weights_the_step_by_one_over_dt():
  log_prob, old, adv, mask, mean, _, std, dt = _inputs(3)
  old_mean = mean + 0.01 * np.random.default_rng(4).normal(size=mean.shape).astype(np.float32)
  got = grpo.normalized_log_ratio(log_prob, old, mean, old_mean, std, dt)
  want = _np_normalized_log_ratio(log_prob, old, mean, old_mean, std, dt)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  loss, metrics = grpo.grpo_loss(
    log_prob,
    old,
    adv,
    mask,
    clip_range=CLIP,
    ratio_norm=True,
    mean=mean,
    old_mean=old_mean,
    std=std,
    dt=dt,
  )
  policy, ratio = _np_policy(want, 0.0, adv, CLIP)
  np.testing.assert_allclose(loss, (policy[mask] / abs(dt)).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_max"], ratio[mask].max(), rtol=1e-6)
  with pytest.raises(ValueError, match="ratio_norm needs"):
    grpo.grpo_loss(log_prob, old, adv, mask, clip_range=CLIP, ratio_norm=True, mean=mean)


def test_ratio_norm_on_policy_is_exactly_one_and_its_gradient_is_the_noise():
  """On-policy (the trained mean is the sampling one) the bias vanishes and the ratio is exactly
  1; the normalised log-ratio's gradient in the mean is eps / numel per element (the raw one's
  times s), so every step contributes on the same scale."""
  rng = np.random.default_rng(5)
  mean = rng.normal(size=(B, 4, 3)).astype(np.float32)
  std, dt = np.float32(0.8), np.float32(-0.25)
  scale = std * np.sqrt(-dt)
  eps = rng.normal(size=mean.shape).astype(np.float32)
  prev = mean + scale * eps

  def log_prob(m):
    lp = -((prev - m) ** 2) / (2 * scale**2) - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)
    return lp.mean(axis=(1, 2))

  old = log_prob(mean)
  adv = rng.normal(size=B).astype(np.float32)
  _, metrics = grpo.grpo_loss(
    old, old, adv, np.ones(B, bool), clip_range=1e-4, ratio_norm=True, mean=mean,
    old_mean=mean, std=std, dt=dt,
  )  # fmt: skip
  for name in ("ratio_mean", "ratio_min", "ratio_max"):
    assert float(metrics[name]) == 1.0, name
  grad = jax.grad(lambda m: grpo.normalized_log_ratio(log_prob(m), old, m, mean, std, dt).sum())(
    jnp.asarray(mean)
  )
  np.testing.assert_allclose(grad, eps / 12, rtol=1e-4, atol=1e-6)


def test_velocity_kl_matches_numpy_and_needs_both_velocities():
  log_prob, old, adv, mask, mean, ref_mean, *_ = _inputs(6)
  beta = 0.1
  loss, metrics = grpo.grpo_loss(
    log_prob, old, adv, mask, clip_range=CLIP, beta=beta, kl_target="velocity",
    velocity=mean, ref_velocity=ref_mean,
  )  # fmt: skip
  kl = 0.5 * ((np.float64(mean) - ref_mean) ** 2).mean(axis=(1, 2))
  policy, _ = _np_policy(log_prob, old, adv, CLIP)
  np.testing.assert_allclose(metrics["kl"], kl[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, (policy + beta * kl)[mask].mean(), rtol=1e-5, atol=1e-7)
  # The gradient flows into the policy's velocity only.
  g = jax.grad(lambda v, r: grpo.velocity_kl(v, r).sum(), argnums=(0, 1))(mean, ref_mean)
  np.testing.assert_allclose(g[0], (mean - ref_mean) / 12, rtol=1e-5, atol=1e-7)
  assert not np.asarray(g[1]).any()
  with pytest.raises(ValueError, match="velocity and ref_velocity"):
    grpo.grpo_loss(log_prob, old, adv, mask, clip_range=CLIP, beta=beta, kl_target="velocity")
  with pytest.raises(ValueError, match="kl_target"):
    grpo.grpo_loss(log_prob, old, adv, mask, clip_range=CLIP, kl_target="score")
