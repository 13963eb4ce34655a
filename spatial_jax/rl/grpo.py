"""The per-timestep GRPO loss for flow-matching policies (Flow-GRPO, grpo.md §1.4).

For one denoising step j, the trainer recomputes the SDE step of each stored trajectory under the
current parameters (teacher forcing), which gives the per-sample `log_prob` (a MEAN over latent
elements, grpo.md §1.2), the step's Gaussian `mean` and its `std`. The loss is PPO's clipped
surrogate on the ratio `exp(log_prob - old_log_prob)` plus an optional KL penalty to the reference
(LoRA-off) policy, averaged over the samples that top-k filtering kept (grpo.md §4).

Two over-optimisation controls of Flow-GRPO's successors (peers_2026.md) are options of the loss:

- `ratio_norm` (GRPO-Guard, arXiv 2510.22319, as verl-omni documents it): with `s = std sqrt(|dt|)`
  the step's standard deviation, the log-ratio of a Gaussian step is
  `eps (mu - mu_old) / s - (mu - mu_old)^2 / (2 s^2)` per element: its second term biases the ratio
  below 1 and its first grows as `1 / s` at the sharp, late steps. RatioNorm adds the bias back,
  `b = mean((mu - mu_old)^2) / (2 s^2)`, and rescales, `r = exp((log_prob - old_log_prob + b) s)`,
  and the step's loss is weighted by `1 / |dt|` so that every step's gradient has the same scale.
- `kl_target="velocity"`: the penalty `0.5 mean((v - v_ref)^2)` on the velocities rather than the
  Gaussian KL of the step means (the "v-based" KL of the peers).

All functions are pure and compute in float32, whatever the input dtype (the SDE math is fp32 in
Flow-GRPO as well, and the ratios sit within ~1e-4 of 1, below bf16's resolution).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# Floor on the KL's variance so that a zero-noise step gives a large but finite KL rather than inf;
# the same clamp as Pref-GRPO's `compute_kl_loss` (grpo.md §1.4).
_MIN_VARIANCE = 1e-20

_KL_FORMS = ("exact", "flow_grpo")
KL_TARGETS = ("mean", "velocity")


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.float32)


def _per_sample(x: jax.Array, ndim: int) -> jax.Array:
  """Appends trailing unit axes so a scalar, (B,) or (B, 1, ...) value broadcasts against (B, ...)."""
  return x.reshape(x.shape + (1,) * (ndim - x.ndim)) if 0 < x.ndim < ndim else x


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  # max(count, 1) so that an empty mask gives 0, not NaN.
  count = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
  return jnp.where(mask, x, 0.0).sum() / count


def clipped_policy_loss(
  log_prob: jax.Array,
  old_log_prob: jax.Array,
  advantages: jax.Array,
  clip_range: float,
) -> jax.Array:
  """PPO's clipped surrogate, per sample: `max(-A r, -A clip(r, 1 - eps, 1 + eps))`.

  `r = exp(log_prob - old_log_prob)` and eps = `clip_range` (Flow-GRPO's default 1e-4, tiny because
  the log-probs are means over latent elements, grpo.md §1.2, §1.6). Where the clipped branch is
  taken the loss is constant in `log_prob`, so its gradient is 0.

  Args:
    log_prob: per-sample log-probs under the current parameters.
    old_log_prob: per-sample log-probs recorded at sampling time (no gradient flows into them).
    advantages: per-sample advantages (no gradient flows into them).
    clip_range: eps of the ratio clip.

  Returns:
    The per-sample loss, float32, with the broadcast shape of the inputs.
  """
  old_log_prob = jax.lax.stop_gradient(_f32(old_log_prob))
  return _clipped_surrogate(_f32(log_prob) - old_log_prob, advantages, clip_range)


def _clipped_surrogate(log_ratio: jax.Array, advantages: jax.Array, clip_range: float):
  advantages = jax.lax.stop_gradient(_f32(advantages))
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  return jnp.maximum(unclipped, clipped)


def _per_sample_value(x: jax.Array, batch: int) -> jax.Array:
  """A scalar, (B,) or (B, 1, ...) per-sample value as (B,)."""
  x = _f32(x)
  return jnp.broadcast_to(x.reshape(x.shape[:1] if x.ndim else ()), (batch,))


def normalized_log_ratio(
  log_prob: jax.Array,
  old_log_prob: jax.Array,
  mean: jax.Array,
  old_mean: jax.Array,
  std: jax.Array,
  dt: jax.Array | float,
) -> jax.Array:
  """GRPO-Guard's RatioNorm: `(log_prob - old_log_prob + b) * s`, (B,) float32.

  `s = std * sqrt(|dt|)` (per sample) and `b = mean_dims((mean - old_mean)^2) / (2 s^2)`, the
  bias of the Gaussian step's log-ratio (module docstring). `old_mean` is the sampling policy's
  step mean (no gradient flows into it, nor into `std` and `dt`). A zero-noise step (s = 0) gives
  0: it has no density and nothing to normalise.
  """
  mean = _f32(mean)
  batch = mean.shape[0]
  old_mean = jax.lax.stop_gradient(_f32(old_mean))
  scale = _per_sample_value(jax.lax.stop_gradient(_f32(std)), batch) * jnp.sqrt(
    jnp.abs(_per_sample_value(jax.lax.stop_gradient(_f32(dt)), batch))
  )
  stochastic = scale > 0
  safe_scale = jnp.where(stochastic, scale, 1.0)
  bias = jnp.square(mean - old_mean).mean(axis=tuple(range(1, mean.ndim))) / (2 * safe_scale**2)
  log_ratio = _f32(log_prob) - jax.lax.stop_gradient(_f32(old_log_prob))
  return jnp.where(stochastic, (log_ratio + bias) * safe_scale, 0.0)


def velocity_kl(velocity: jax.Array, ref_velocity: jax.Array) -> jax.Array:
  """`0.5 * mean_dims((v - v_ref)^2)`, (B,) float32: the KL between unit Gaussians centred on the
  two velocities, per element (no gradient into `ref_velocity`)."""
  velocity = _f32(velocity)
  ref_velocity = jax.lax.stop_gradient(_f32(ref_velocity))
  return 0.5 * jnp.square(velocity - ref_velocity).mean(axis=tuple(range(1, velocity.ndim)))


def kl_to_reference(
  mean: jax.Array,
  ref_mean: jax.Array,
  std: jax.Array,
  dt: jax.Array | float | None = None,
  form: str = "exact",
) -> jax.Array:
  """Per-sample KL between the policy's and the reference's Gaussian step, in mean space.

  Both steps are `N(mu, (std * sqrt(-dt))^2 I)` with the same variance (grpo.md §1.2: the step's
  returned `std_t` EXCLUDES `sqrt(-dt)`), so their KL is `||mu - mu_ref||^2 / (2 var)` per element.
  Like the log-prob, it is averaged (not summed) over the non-batch dims.

  - `form="exact"`: `mean_dims((mu - mu_ref)^2) / (2 * std^2 * |dt|)`, the true Gaussian KL per
    element, as Pref-GRPO / TempFlow's paper version (grpo.md §1.4).
  - `form="flow_grpo"`: `mean_dims((mu - mu_ref)^2) / (2 * std^2)`, what Flow-GRPO's
    `train_sd3.py` / `train_flux.py` compute: it divides by `std_t^2` without the `|dt|` factor
    (its issue #78). It equals `|dt| * exact`, so a Flow-GRPO beta (e.g. 0.01 or 0.04, grpo.md
    §1.6) corresponds to `beta * |dt|` with `form="exact"`; with 6 Flux steps |dt| is ~0.1-0.2,
    i.e. the exact KL is 5-10x larger. `dt` is unused.

  The reference is a fixed target: no gradient flows into `ref_mean`, `std` or `dt`.

  Args:
    mean: (B, ...) the policy step's mean (gradient flows here).
    ref_mean: (B, ...) the reference step's mean, e.g. the same apply with the LoRA delta off.
    std: the step's `std_t` (without `sqrt(-dt)`): a scalar, (B,) or (B, 1, ...).
    dt: `sigma_next - sigma` (negative; its sign is ignored): a scalar, (B,) or (B, 1, ...).
      Required for `form="exact"`.
    form: "exact" or "flow_grpo".

  Returns:
    (B,) per-sample KL, float32.

  Raises:
    ValueError: on an unknown `form`, or `form="exact"` without `dt`.
  """
  if form not in _KL_FORMS:
    raise ValueError(f"form must be one of {_KL_FORMS}, got {form!r}")
  mean = _f32(mean)
  ref_mean = jax.lax.stop_gradient(_f32(ref_mean))
  variance = jnp.square(jax.lax.stop_gradient(_f32(std)))
  if form == "exact":
    if dt is None:
      raise ValueError('kl_to_reference(form="exact") needs dt; use form="flow_grpo" without it')
    variance = variance * jnp.abs(jax.lax.stop_gradient(_f32(dt)))
  variance = _per_sample(jnp.maximum(variance, _MIN_VARIANCE), mean.ndim)
  per_element = jnp.square(mean - ref_mean) / (2.0 * variance)
  return per_element.mean(axis=tuple(range(1, mean.ndim)))


def grpo_loss(
  log_prob: jax.Array,
  old_log_prob: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  clip_range: float,
  beta: float = 0.0,
  mean: jax.Array | None = None,
  ref_mean: jax.Array | None = None,
  std: jax.Array | None = None,
  dt: jax.Array | float | None = None,
  kl_form: str = "exact",
  kl_target: str = "mean",
  velocity: jax.Array | None = None,
  ref_velocity: jax.Array | None = None,
  ratio_norm: bool = False,
  old_mean: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRPO loss of one timestep: mean over kept samples of clipped surrogate + beta * KL.

  `loss = sum_kept(policy_i + beta * kl_i) / max(n_kept, 1)` in float32 (grpo.md §1.4). Dropped
  samples (mask False) contribute nothing, not even NaN/inf from their inputs. Flow-GRPO averages
  the policy loss and the KL over the batch separately; over the same kept samples that is the same
  number. The KL is computed only when `beta` is not a Python 0 (a traced `beta` always computes
  it), and then needs `mean`, `ref_mean`, `std` (and `dt` for `kl_form="exact"`).

  Args:
    log_prob: (B,) log-probs of the step under the current parameters.
    old_log_prob: (B,) log-probs recorded at sampling time.
    advantages: (B,) advantages (already clipped, e.g. by `topk_group_advantages`).
    mask: (B,) bool, True for samples that count (top-k filtering's mask, flattened).
    clip_range: eps of the ratio clip.
    beta: KL coefficient; 0 disables the KL.
    mean: (B, ...) the policy step's mean, for the KL.
    ref_mean: (B, ...) the reference step's mean, for the KL.
    std: the step's `std_t` (without `sqrt(-dt)`), for the KL.
    dt: `sigma_next - sigma`, for `kl_form="exact"`.
    kl_form: "exact" or "flow_grpo"; see `kl_to_reference`.
    kl_target: "mean" (the KL of the step means, `kl_to_reference`) or "velocity"
      (`velocity_kl`, which needs `velocity` and `ref_velocity`).
    velocity: (B, ...) the policy's velocity, for `kl_target="velocity"`.
    ref_velocity: (B, ...) the reference's velocity, for `kl_target="velocity"`.
    ratio_norm: GRPO-Guard's ratio normalisation (`normalized_log_ratio`) and its `1 / |dt|`
      weight of the policy loss; needs `mean`, `old_mean`, `std` and `dt`.
    old_mean: (B, ...) the sampling policy's step mean, for `ratio_norm`.

  Returns:
    `(loss, metrics)`: a float32 scalar and a dict of float32 scalars over the kept samples:
    `policy_loss`, `kl` (0 when not computed), `clipfrac` (fraction with |r - 1| > clip_range),
    `approx_kl` (0.5 * mean((log_prob - old_log_prob)^2), as Flow-GRPO), `ratio_mean`,
    `ratio_min`, `ratio_max`, and `kept_fraction` (kept / B). With nothing kept, all are 0.

  Raises:
    ValueError: on a negative Python `beta`, an unknown `kl_target`, or a KL or a ratio
      normalisation without its inputs.
  """
  if isinstance(beta, int | float) and beta < 0:
    raise ValueError(f"beta must be >= 0, got {beta}")
  if kl_target not in KL_TARGETS:
    raise ValueError(f"kl_target must be one of {KL_TARGETS}, got {kl_target!r}")
  mask = jnp.asarray(mask, dtype=bool)
  log_prob = _f32(log_prob)
  old_log_prob = jax.lax.stop_gradient(_f32(old_log_prob))
  # Zero the dropped samples' inputs so that a NaN or inf there cannot leak into the gradient
  # through jnp.where's unselected branch.
  log_prob_kept = jnp.where(mask, log_prob, 0.0)
  old_log_prob_kept = jnp.where(mask, old_log_prob, 0.0)
  log_ratio = log_prob_kept - old_log_prob_kept
  if ratio_norm:
    if mean is None or old_mean is None or std is None or dt is None:
      raise ValueError("ratio_norm needs mean, old_mean, std and dt")
    latent_mask = _per_sample(mask, _f32(mean).ndim)
    log_ratio = normalized_log_ratio(
      log_prob_kept,
      old_log_prob_kept,
      jnp.where(latent_mask, _f32(mean), 0.0),
      jnp.where(latent_mask, _f32(old_mean), 0.0),
      std,
      dt,
    )
  policy = _clipped_surrogate(log_ratio, jnp.where(mask, _f32(advantages), 0.0), clip_range)
  if ratio_norm:  # GRPO-Guard's gradient reweight: the same scale at every step.
    policy = policy / jnp.abs(_per_sample_value(jax.lax.stop_gradient(_f32(dt)), mask.shape[0]))
  per_sample = policy

  compute_kl = not (isinstance(beta, int | float) and beta == 0)
  if compute_kl and kl_target == "velocity":
    if velocity is None or ref_velocity is None:
      raise ValueError('beta > 0 with kl_target="velocity" needs velocity and ref_velocity')
    latent_mask = _per_sample(mask, _f32(velocity).ndim)
    kl = velocity_kl(
      jnp.where(latent_mask, _f32(velocity), 0.0), jnp.where(latent_mask, _f32(ref_velocity), 0.0)
    )
  elif compute_kl:
    if mean is None or ref_mean is None or std is None:
      raise ValueError("beta > 0 needs mean, ref_mean and std for the KL")
    mean, ref_mean = _f32(mean), _f32(ref_mean)
    latent_mask = _per_sample(mask, mean.ndim)
    kl = kl_to_reference(
      jnp.where(latent_mask, mean, 0.0),
      jnp.where(latent_mask, ref_mean, 0.0),
      std,
      dt,
      form=kl_form,
    )
  if compute_kl:
    kl = jnp.where(mask, kl, 0.0)
    per_sample = per_sample + _f32(beta) * kl
    kl_metric = _masked_mean(kl, mask)
  else:
    kl_metric = jnp.zeros((), jnp.float32)

  log_ratio = jnp.where(mask, log_ratio, 0.0)
  ratio = jnp.exp(jax.lax.stop_gradient(log_ratio))
  any_kept = mask.any()
  metrics = {
    "policy_loss": _masked_mean(policy, mask),
    "kl": kl_metric,
    "clipfrac": _masked_mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32), mask),
    "approx_kl": 0.5 * _masked_mean(jnp.square(jax.lax.stop_gradient(log_ratio)), mask),
    "ratio_mean": _masked_mean(ratio, mask),
    "ratio_min": jnp.where(any_kept, jnp.where(mask, ratio, jnp.inf).min(), 0.0),
    "ratio_max": jnp.where(any_kept, jnp.where(mask, ratio, -jnp.inf).max(), 0.0),
    "kept_fraction": mask.mean(dtype=jnp.float32),
  }
  return _masked_mean(per_sample, mask), metrics


def reward_metrics(rewards: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Reward statistics for logging: over all samples and over the kept ones.

  Args:
    rewards: rewards of any shape, e.g. (P, G).
    mask: bool of the same shape, True for kept samples.

  Returns:
    float32 scalars `reward_mean`, `reward_std`, `reward_kept_mean`, `reward_kept_std`
    (population stds; the kept ones are 0 when nothing is kept).
  """
  rewards = _f32(rewards)
  mask = jnp.broadcast_to(jnp.asarray(mask, dtype=bool), rewards.shape)
  kept_mean = _masked_mean(rewards, mask)
  return {
    "reward_mean": rewards.mean(),
    "reward_std": rewards.std(),
    "reward_kept_mean": kept_mean,
    "reward_kept_std": jnp.sqrt(_masked_mean(jnp.square(rewards - kept_mean), mask)),
  }
