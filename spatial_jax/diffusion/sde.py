"""Flow-GRPO's SDE sampling step with log-probabilities, and an SDE sampler as one `lax.scan`.

The step is Flow-GRPO's `sde_step_with_logprob` (`sde_type="sde"`, Euler–Maruyama; grpo.md §1.2):
with `dt = sigma_next - sigma < 0` and `a = noise_level`,

  std_t    = a * sqrt(sigma / (1 - (sigma == 1 ? sigma_max : sigma)))
  mean     = x * (1 + std_t^2 / (2 sigma) * dt) + v * (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt
  x_next   = mean + std_t * sqrt(-dt) * eps,   eps ~ N(0, I)
  log_prob = mean over non-batch dims of log N(stop_gradient(x_next); mean, (std_t sqrt(-dt))^2)

all in fp32 (Flow-GRPO casts first: "bf16 can overflow here when compute prev_sample_mean").

`sde_type="cps"` is coefficients-preserving sampling (FlowCPS, arXiv 2509.05952; Flow-GRPO's
`sde_type="cps"`, grpo.md §1.7): with the predicted data `x0 = x - sigma v` and noise
`x1 = x + (1 - sigma) v`, and `s = sigma_next * sin(a pi / 2)`,

  mean     = (1 - sigma_next) x0 + sqrt(sigma_next^2 - s^2) x1,   x_next = mean + s * eps

so the injected noise never exceeds the noise the next sigma holds (`a = 0` is the Euler step).
Flow-GRPO's CPS log-prob is `-(x_next - mean)^2` with every constant AND the 1 / (2 s^2) dropped;
here it is the true Gaussian log-density (the same form as the SDE step's), so ratios, clipping
and the KL mean the same thing for both samplers. For the same reason the returned `std` is
`s / sqrt(-dt)`: `std * sqrt(-dt)` is the step's standard deviation for both types.

Training-time recomputation (the GRPO ratio and the KL term) is the same function scoring the
stored next latents instead of sampling them; for a trajectory `traj` from `sample_sde` and step
`j`:

  x, sigmas = traj.latents[j], traj.sigmas
  _, log_prob, mean, std = sde_step_with_logprob(
    x, velocity(x, sigmas[j]), sigmas[j], sigmas[j + 1], noise_level,
    sigma_max=sigmas[1], prev_sample=traj.latents[j + 1])

With the same velocity numerics this reproduces `traj.log_probs[j]` (ratio 1 on-policy, grpo.md §6
item 4). Only steps with `traj.stochastic[j]` are meaningful to train on: elsewhere the step was the
ODE step and its log-prob is 0 by convention (see below). `std` excludes `sqrt(-dt)`, as in
Flow-GRPO, so Flow-GRPO's KL is `mean((mean - mean_ref)^2) / (2 * std^2)` (grpo.md §6 item 2).

Design decisions:
- `sigma_max` (Flow-GRPO's `sigmas[1]`) is only read when `sigma == 1`, i.e. at the first step of
  a schedule that starts at pure noise. When it is None it defaults to `sigma_next`: at that first
  step `sigma_next` *is* `sigmas[1]`, so the default reproduces Flow-GRPO for any decreasing
  schedule. `sample_sde` passes `sigmas[1]` explicitly anyway.
- `noise_level == 0` (or `dt == 0`) makes the Gaussian a point mass: the step is then exactly the
  Euler ODE step (`mean = x + v * dt`, no noise) and `log_prob` is defined as 0 rather than
  NaN/inf. The guard is a `jnp.where` with a safe denominator, so it works with traced noise levels
  and gives finite (zero) gradients there.
- Sigmas and the noise level may be Python floats, traced scalars, or per-sample arrays of shape
  (B,); the sigma == 1 guard is a `jnp.where`, so the step jits with traced sigmas.
- The sampler keeps the latents trajectory in fp32 (as Flow-GRPO's step returns fp32 latents) and
  calls `velocity` with fp32 latents; a bf16 model casts inside its velocity function. Training must
  call the velocity the same way (fp32 latents in) to keep the ratio at 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from spatial_jax.diffusion.sampler import VelocityFn

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

SDE_TYPES = ("sde", "cps")


def _per_sample(value, ndim: int) -> jax.Array:
  """fp32 scalar, or a (B,) array reshaped to broadcast against (B, ...) of rank `ndim`."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 0:
    return value
  if value.ndim == 1:
    return value.reshape(value.shape + (1,) * (ndim - 1))
  raise ValueError(f"Expected a scalar or a per-sample (B,) array, got shape {value.shape}")


def sde_step_with_logprob(
  sample: jax.Array,
  velocity: jax.Array,
  sigma,
  sigma_next,
  noise_level,
  *,
  sigma_max=None,
  key: jax.Array | None = None,
  prev_sample: jax.Array | None = None,
  noise: jax.Array | None = None,
  sde_type: str = "sde",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One Flow-GRPO stochastic step from `sigma` to `sigma_next` (< sigma), with its log-prob.

  Args:
    sample: x at `sigma`, (B, ...) (packed latents: (B, N, C)); any float dtype.
    velocity: the model's velocity at (sample, sigma), same shape.
    sigma: the current sigma in (0, 1]; scalar or (B,).
    sigma_next: the next sigma in [0, sigma); scalar or (B,).
    noise_level: Flow-GRPO's `a` (0.7 default there, 0.9 for Flux); scalar or (B,). 0 gives the
      ODE step with log_prob 0.
    sigma_max: the schedule's `sigmas[1]`, used in place of `sigma` in `1 - sigma` when
      `sigma == 1` (where the formula divides by zero). None: `sigma_next` (the same value at the
      only step where sigma == 1 in a decreasing schedule).
    key: PRNG key for eps ~ N(0, I) when sampling.
    prev_sample: if given, this x_next is scored instead of sampled (key and noise are ignored).
    noise: an explicit eps (same shape as `sample`) instead of `key`.
    sde_type: "sde" (Euler–Maruyama, Flow-GRPO's default) or "cps" (see the module docstring).

  Returns:
    (prev_sample, log_prob, mean, std): the next latents (fp32; the given `prev_sample` cast to
    fp32 when scoring), the (B,) log-density of stop_gradient(prev_sample) averaged over all
    non-batch dims, the fp32 mean, and `std_t` WITHOUT the sqrt(-dt) factor (as Flow-GRPO returns
    it), of shape () or (B, 1, ...) to broadcast against `sample`.

  Raises:
    ValueError: when sampling with neither or both of `key` and `noise`, or on an unknown
      `sde_type`.
  """
  if sde_type not in SDE_TYPES:
    raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
  ndim = sample.ndim
  # Flow-GRPO: everything in fp32 ("bf16 can overflow here when compute prev_sample_mean").
  x = sample.astype(jnp.float32)
  v = velocity.astype(jnp.float32)
  sigma = _per_sample(sigma, ndim)
  sigma_next = _per_sample(sigma_next, ndim)
  a = _per_sample(noise_level, ndim)
  sigma_max = sigma_next if sigma_max is None else _per_sample(sigma_max, ndim)
  dt = sigma_next - sigma  # negative: sigma runs from noise (1) to data (0)

  if sde_type == "cps":
    scale = sigma_next * jnp.sin(a * (math.pi / 2))  # the std of x_next given x
    predicted_data, predicted_noise = x - sigma * v, x + (1 - sigma) * v
    kept_noise = jnp.sqrt(jnp.maximum(sigma_next**2 - scale**2, 0.0))
    mean = (1 - sigma_next) * predicted_data + kept_noise * predicted_noise
    # As the SDE step's std_t, without sqrt(-dt) (0 where dt is 0: no step, no noise).
    std = jnp.where(dt < 0, scale / jnp.sqrt(jnp.where(dt < 0, -dt, 1.0)), 0.0)
  else:
    # Flow-GRPO guards sigma == 1 (the first step) with sigmas[1]; `>=` also keeps sigma a hair
    # above 1 finite. jnp.where (not a Python if) so traced sigmas jit.
    denominator = 1 - jnp.where(sigma >= 1, sigma_max, sigma)
    std = a * jnp.sqrt(sigma / denominator)
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    scale = std * jnp.sqrt(-dt)  # the std of x_next given x

  if prev_sample is None:
    if (key is None) == (noise is None):
      raise ValueError("Sampling needs exactly one of `key` and `noise` (or pass `prev_sample`).")
    if noise is None:
      noise = jax.random.normal(key, x.shape, jnp.float32)
    prev_sample = mean + scale * noise.astype(jnp.float32)
  else:
    prev_sample = prev_sample.astype(jnp.float32)

  # A point mass (noise_level 0 or dt 0) has no density: log_prob is 0 there by convention, and
  # the safe denominator keeps both the value and its gradient finite.
  stochastic = scale > 0
  safe_scale = jnp.where(stochastic, scale, 1.0)
  diff = jax.lax.stop_gradient(prev_sample) - mean
  log_prob = -(diff**2) / (2 * safe_scale**2) - jnp.log(safe_scale) - _LOG_SQRT_2PI
  log_prob = jnp.where(stochastic, log_prob, 0.0)
  # Flow-GRPO: a MEAN over all non-batch dims, not a sum, which keeps ratios near 1 (hence its tiny
  # clip range, grpo.md §1.2).
  log_prob = jnp.mean(log_prob, axis=tuple(range(1, ndim)))
  return prev_sample, log_prob, mean, std


class SDETrajectory(NamedTuple):
  """What `sample_sde` records (a pytree; the leading axes are steps).

  Attributes:
    latents: (T + 1, B, N, C) fp32: x at every sigma, the start (`latents[0]`) and the end.
    log_probs: (T, B) fp32: log p(latents[j + 1] | latents[j]); 0 at ODE steps.
    sigmas: (T + 1,) fp32: the schedule; step j goes from sigmas[j] to sigmas[j + 1].
    stochastic: (T,) bool: which steps were SDE steps (inside the window).
    means: (T, B, N, C) fp32, the sampling policy's step means (what GRPO-Guard's ratio
      normalisation compares the trained policy's with), or None when not kept.
  """

  latents: jax.Array
  log_probs: jax.Array
  sigmas: jax.Array
  stochastic: jax.Array
  means: jax.Array | None = None


def sample_sde(
  velocity: VelocityFn,
  latents: jax.Array,
  sigmas: jax.Array,
  key: jax.Array,
  *,
  noise_level,
  sde_window=None,
  sde_type: str = "sde",
  sigma_max=None,
  step_offset: int = 0,
  keep_means: bool = False,
) -> SDETrajectory:
  """Integrates from sigmas[0] to sigmas[-1] with Flow-GRPO SDE steps, as one `lax.scan`.

  Args:
    velocity: velocity(latents, sigma) on packed (B, N, C) latents; called with fp32 latents.
    latents: the initial noise at sigmas[0], (B, N, C).
    sigmas: (T + 1,) decreasing sigmas (e.g. `FlowMatchSchedule.sigmas`); T >= 1 steps.
    key: PRNG key; step j draws from `fold_in(key, j + step_offset)`, one normal array over the
      whole batch, so every sample and step gets distinct noise. Give each device/process its own
      key.
    noise_level: Flow-GRPO's `a` for the stochastic steps (may be traced). 0: the Euler ODE
      sampler (eval in Flow-GRPO), log_probs all 0.
    sde_window: (start, end): only steps start..end-1 are stochastic (Flow-GRPO-Fast/MixGRPO,
      grpo.md §1.7), the others are ODE steps with log_prob 0. The bounds may be traced ints, so a
      per-batch random window does not recompile. None: all T steps are stochastic. (Flow-GRPO's
      default window `(0, T - 1)` leaves the last, very sharp step out; pass that to match it.)
    sde_type: "sde" or "cps" (`sde_step_with_logprob`).
    sigma_max: Flow-GRPO's `sigmas[1]` of the whole schedule, for a call that continues a
      trajectory from a later step (`sigmas` then starts there); None: this `sigmas[1]`.
    step_offset: the index of `sigmas[0]` in the whole schedule (for the noise keys), when
      continuing a trajectory.
    keep_means: also record every step's mean (`SDETrajectory.means`).

  Returns:
    The `SDETrajectory`; `latents[-1]` is the sample.
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  num_steps = sigmas.shape[0] - 1
  steps = jnp.arange(num_steps)
  if sde_window is None:
    stochastic = jnp.ones((num_steps,), bool)
  else:
    start, end = sde_window
    stochastic = (steps >= start) & (steps < end)
  noise_level = jnp.asarray(noise_level, jnp.float32)
  # Flow-GRPO's sigma_max = sigmas[1]; only read at a step with sigma == 1.
  if sigma_max is None:
    sigma_max = sigmas[min(1, num_steps)]

  def body(x, inputs):
    step, sigma, sigma_next, is_sde = inputs
    # Noise level 0 outside the window is exactly the Euler ODE step (as Flow-GRPO-Fast does).
    a = jnp.where(is_sde, noise_level, 0.0)
    x_next, log_prob, mean, _ = sde_step_with_logprob(
      x,
      velocity(x, sigma),
      sigma,
      sigma_next,
      a,
      sigma_max=sigma_max,
      key=jax.random.fold_in(key, step + step_offset),
      sde_type=sde_type,
    )
    return x_next, (x_next, log_prob, mean if keep_means else None)

  x0 = latents.astype(jnp.float32)
  _, (xs, log_probs, means) = jax.lax.scan(body, x0, (steps, sigmas[:-1], sigmas[1:], stochastic))
  return SDETrajectory(
    latents=jnp.concatenate([x0[None], xs], axis=0),
    log_probs=log_probs,
    sigmas=sigmas,
    stochastic=stochastic,
    means=means,
  )
