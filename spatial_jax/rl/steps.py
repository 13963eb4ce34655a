"""The pure, jitted phases of a GRPO step: rollout and training.

Rollout (no gradients): P prompts x G samples from distinct noise, Flow-GRPO's SDE sampler on the
FLUX schedule (`sde.sample_sde`, one `lax.scan`), recording the latents at every step and the
log-probs of the stochastic steps.

Training, on the kept samples (top-k and bottom-k of each group) and the trained timesteps: for
each timestep j, in order, the SDE step is recomputed with the current LoRA params, scoring the
stored `latents[j + 1]` (teacher forcing), and the clipped GRPO objective (+ beta * KL to the
LoRA-off reference) is differentiated; the gradients of all trained timesteps of a minibatch are
averaged and applied as one optimizer update (Flow-GRPO accumulates over timesteps the same way,
grpo.md §1.4). The timesteps run in a `lax.scan`, so only one timestep's activations are alive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spatial_jax import lora
from spatial_jax.diffusion.sde import SDETrajectory, sample_sde, sde_step_with_logprob
from spatial_jax.diffusion.text_to_image import TextToImage
from spatial_jax.rl.grpo import grpo_loss

# Metrics reduced over timesteps by min / max instead of the mean.
MIN_METRICS = ("ratio_min",)
MAX_METRICS = ("ratio_max",)


def _combine(name: str, total: jax.Array, value: jax.Array) -> jax.Array:
  """Accumulates a metric over timesteps: min / max for the ratio extremes, else the sum."""
  if name in MIN_METRICS:
    return jnp.minimum(total, value)
  if name in MAX_METRICS:
    return jnp.maximum(total, value)
  return total + value


WINDOW_MODES = ("fixed", "branch", "sliding")


def make_rollout(
  graphdef: nnx.GraphDef,
  policy: TextToImage,
  sigmas: jax.Array,
  config: Any,
  default_window: tuple[int, int] | None = None,
):
  """(trainable, frozen, prompt_embeds, pooled, key, window) -> SDETrajectory of
  B = len(prompt_embeds) samples; `window` = (start, end), the stochastic steps (jit it as a
  static argument: one compilation per distinct window), by default `default_window` or the
  first training step's (`sde_window`).

  With `grpo.same_initial_noise` and a window that starts after step 0, the G samples of a group
  share their trajectory up to the window (one noise, ODE steps), so it is computed once per
  group and branched there (Flow-GRPO-Fast's branching): the prefix costs P, not P x G, model
  evaluations. The trajectory is the one an unshared rollout gives (same noise keys)."""
  g, s = config.grpo, config.sampling
  sde_type = s.get("sde_type", "sde")
  keep_means = bool(g.get("ratio_norm", False))
  if default_window is None:
    default_window = sde_window(config, sigmas.shape[0] - 1)

  def rollout(trainable, frozen, prompt_embeds, pooled, key, window=default_window):
    model = nnx.merge(graphdef, trainable, frozen)
    init_key, sde_key = jax.random.split(key)
    start, end = window
    batch = prompt_embeds.shape[0]
    x = initial_noise(init_key, batch, policy.latent_shape, config)
    velocity = policy.velocity(model, prompt_embeds, pooled)
    if not (g.same_initial_noise and start > 0):
      return sample_sde(
        velocity,
        x,
        sigmas,
        sde_key,
        noise_level=g.noise_level,
        sde_window=window,
        sde_type=sde_type,
        keep_means=keep_means,
      )
    G = g.group_size
    # The shared prefix: one row per group (its samples' initial noise is the same), ODE steps.
    prefix = sample_sde(
      policy.velocity(model, prompt_embeds[::G], pooled[::G]),
      x[::G],
      sigmas[: start + 1],
      sde_key,
      noise_level=0.0,
      sigma_max=sigmas[1],
    )
    rest = sample_sde(
      velocity,
      jnp.repeat(prefix.latents[-1], G, axis=0),
      sigmas[start:],
      sde_key,
      noise_level=g.noise_level,
      sde_window=(0, end - start),
      sde_type=sde_type,
      sigma_max=sigmas[1],
      step_offset=start,
      keep_means=keep_means,
    )
    means = None
    if keep_means:  # Prefix steps are never trained; their means are not needed.
      means = jnp.concatenate([jnp.zeros((start, *rest.means.shape[1:])), rest.means])
    return SDETrajectory(
      latents=jnp.concatenate([jnp.repeat(prefix.latents[:-1], G, axis=1), rest.latents]),
      log_probs=jnp.concatenate([jnp.zeros((start, batch), jnp.float32), rest.log_probs]),
      sigmas=sigmas,
      stochastic=jnp.concatenate([jnp.zeros((start,), bool), rest.stochastic]),
      means=means,
    )

  return rollout


def initial_noise(key: jax.Array, batch: int, latent_shape: tuple[int, ...], config: Any):
  """The rollout's starting latents, (batch, *latent_shape) fp32: distinct per sample, or, with
  `grpo.same_initial_noise`, one draw per group of `group_size` adjacent samples (DanceGRPO's
  `--init_same_noise`): the group's samples then differ only by the SDE noise that their
  log-probs score, so the reward differences within a group are all credited to trained steps."""
  g = config.grpo
  if not g.same_initial_noise:
    return jax.random.normal(key, (batch, *latent_shape), jnp.float32)
  if batch % g.group_size:
    raise ValueError(f"A rollout of {batch} samples is not whole groups of {g.group_size}.")
  x = jax.random.normal(key, (batch // g.group_size, *latent_shape), jnp.float32)
  return jnp.repeat(x, g.group_size, axis=0)


def window_range(config: Any, num_steps: int) -> tuple[int, int]:
  """`sampling.sde_window`, the steps [start, end) where stochastic steps may be, or, when empty,
  every step but the last, sharp one (Flow-GRPO's default window).

  Raises:
    ValueError: the range does not lie within the sampling steps.
  """
  if not config.sampling.sde_window:
    return 0, num_steps - 1
  start, end = (int(x) for x in config.sampling.sde_window)
  if not 0 <= start < end <= num_steps:
    raise ValueError(
      f"config.sampling.sde_window=({start}, {end}) must satisfy 0 <= start < end <= "
      f"sampling.num_steps={num_steps}."
    )
  return start, end


def window_size(config: Any, num_steps: int) -> int:
  """How many steps of each rollout are stochastic: the whole range (`sde_window_mode="fixed"`)
  or `sampling.sde_window_size` (a window that moves within the range)."""
  start, end = window_range(config, num_steps)
  s = config.sampling
  mode = s.get("sde_window_mode", "fixed")
  if mode not in WINDOW_MODES:
    raise ValueError(f"config.sampling.sde_window_mode={mode!r}; use one of {WINDOW_MODES}.")
  if mode == "fixed":
    return end - start
  size = int(s.sde_window_size)
  if not 1 <= size <= end - start:
    raise ValueError(
      f"config.sampling.sde_window_size={size} must be in [1, {end - start}], the steps of "
      f"sampling.sde_window=({start}, {end})."
    )
  return size


def sde_window(config: Any, num_steps: int, step: int = 1) -> tuple[int, int]:
  """The stochastic steps [start, end) of the rollout of training step `step` (1-based).

  - `sampling.sde_window_mode="fixed"`: the whole `window_range`, every step.
  - `"branch"` (Flow-GRPO-Fast): `sde_window_size` steps from a start drawn for each training
    step, uniformly within the range, from (seed, step): ODE before and after.
  - `"sliding"` (MixGRPO's progressive window): the window starts at the range's start and moves
    one step later every `sde_window_every` training steps, back to the start past the end.
  """
  start, end = window_range(config, num_steps)
  size = window_size(config, num_steps)
  mode = config.sampling.get("sde_window_mode", "fixed")
  if mode == "fixed":
    return start, end
  positions = end - start - size + 1
  if mode == "branch":
    offset = int(np.random.default_rng((config.seed, step, 7)).integers(positions))
  else:
    every = max(1, int(config.sampling.get("sde_window_every", 1)))
    offset = ((step - 1) // every) % positions
  return start + offset, start + offset + size


def trained_timesteps(config: Any, num_steps: int, step: int = 1) -> tuple[int, ...]:
  """The SDE steps that are trained at training step `step`: the first `timestep_fraction` of
  its window's stochastic steps, in order (Flow-GRPO: 10 steps x 0.99 -> the first 9). Every
  step trains the same number of timesteps (the window's size is fixed)."""
  g = config.grpo
  start, end = sde_window(config, num_steps, step)
  stochastic = list(range(start, end))
  count = int(len(stochastic) * g.timestep_fraction)
  if count < 1:
    raise ValueError(
      f"No timestep to train: {len(stochastic)} stochastic steps (sampling.sde_window="
      f"{config.sampling.sde_window}, sampling.num_steps={num_steps}) x grpo.timestep_fraction="
      f"{g.timestep_fraction}."
    )
  return tuple(stochastic[:count])


def evaluations_per_step(config: Any, num_steps: int, step: int, kept: int, cfg: bool) -> dict:
  """Model evaluations (one sample through the transformer; x2 with true CFG) of training step
  `step`: the rollout's (a shared prefix counts once per group) and training's forward passes
  (+1 per trained sample and timestep for the reference, with a KL), for the `nfe/` metrics."""
  g = config.grpo
  start, _ = sde_window(config, num_steps, step)
  prompts, group = g.prompts_per_step, g.group_size
  factor = 2 if cfg else 1
  shared = start if g.same_initial_noise else 0
  rollout = factor * (prompts * shared + prompts * group * (num_steps - shared))
  train_steps = len(trained_timesteps(config, num_steps, step))
  train = factor * kept * train_steps * (2 if g.beta > 0 else 1)
  return {"nfe/rollout": rollout, "nfe/train": train, "nfe/total": rollout + train}


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  policy: TextToImage,
  sigmas: jax.Array,
  timesteps: Sequence[int],
  config: Any,
):
  """(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics) for one minibatch.

  `batch` holds, for the minibatch's B samples: `latents` (T + 1, B, N, C), `log_probs` (T, B)
  (the rollout's, "old"), `advantages` (B,), `mask` (B,), `prompt_embeds`, `pooled`; with
  `grpo.ratio_norm`, `means` (T, B, N, C), the rollout's step means; and optionally `timesteps`,
  an int array of the trained steps (a window that moves per training step), of the length of
  `timesteps` (which it replaces; a traced input, so a moving window does not recompile).
  """
  g = config.grpo
  sigmas = jnp.asarray(sigmas, jnp.float32)
  static_js = jnp.asarray(timesteps, jnp.int32)
  sde_type = config.sampling.get("sde_type", "sde")
  kl_target = g.get("kl_target", "mean")
  ratio_norm = bool(g.get("ratio_norm", False))

  def step_at(model: Any, batch: dict[str, jax.Array], j: jax.Array, x: jax.Array):
    v = policy.velocity(model, batch["prompt_embeds"], batch["pooled"])(x, sigmas[j])
    _, log_prob, mean, std = sde_step_with_logprob(
      x,
      v,
      sigmas[j],
      sigmas[j + 1],
      g.noise_level,
      sigma_max=sigmas[1],
      prev_sample=batch["latents"][j + 1],
      sde_type=sde_type,
    )
    return log_prob, mean, std, v

  def loss_at(trainable, frozen, batch, j):
    x = batch["latents"][j]
    model = nnx.merge(graphdef, trainable, frozen)
    log_prob, mean, std, v = step_at(model, batch, j, x)
    ref_mean = ref_v = None
    if g.beta > 0:
      # The reference policy: the base model, the LoRA layers switched off (no weights copied).
      # It is the policy GRPO started from while the adapters start at B = 0, as here.
      with lora.disabled(model):
        _, ref_mean, _, ref_v = step_at(model, batch, j, x)
      ref_mean, ref_v = jax.lax.stop_gradient(ref_mean), jax.lax.stop_gradient(ref_v)
    return grpo_loss(
      log_prob,
      batch["log_probs"][j],
      batch["advantages"],
      batch["mask"],
      clip_range=g.clip_range,
      beta=g.beta,
      mean=mean,
      ref_mean=ref_mean,
      std=std,
      dt=sigmas[j + 1] - sigmas[j],
      kl_form=g.kl_form,
      kl_target=kl_target,
      velocity=v,
      ref_velocity=ref_v,
      ratio_norm=ratio_norm,
      old_mean=batch["means"][j] if ratio_norm else None,
    )

  def train_step(trainable, opt_state, frozen, batch):
    js = batch.get("timesteps", static_js)
    grad_fn = jax.value_and_grad(loss_at, has_aux=True)

    def body(carry, j):
      grads, totals = carry
      (loss, metrics), step_grads = grad_fn(trainable, frozen, batch, j)
      metrics = dict(metrics, loss=loss)
      grads = jax.tree.map(jnp.add, grads, step_grads)
      totals = {k: _combine(k, totals[k], v) for k, v in metrics.items()}
      return (grads, totals), None

    (_, shapes), _ = jax.eval_shape(lambda: grad_fn(trainable, frozen, batch, js[0]))
    init_totals = {
      k: jnp.full((), jnp.inf if k in MIN_METRICS else -jnp.inf if k in MAX_METRICS else 0.0)
      for k in (*shapes, "loss")
    }
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, totals), _ = jax.lax.scan(body, (zeros, init_totals), js)
    n = js.shape[0]
    grads = jax.tree.map(lambda x: x / n, grads)
    metrics = {k: v if k in (*MIN_METRICS, *MAX_METRICS) else v / n for k, v in totals.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return trainable, opt_state, metrics

  return train_step


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW at a constant learning rate (Flow-GRPO's), global-norm clipping, optional EMA."""
  from spatial_jax.optim import params_ema

  t = config.train
  parts = [
    optax.clip_by_global_norm(t.grad_clip),
    optax.adamw(t.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay),
  ]
  if t.ema_decay > 0:
    parts.append(params_ema(t.ema_decay))
  return optax.chain(*parts)
