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


def make_rollout(graphdef: nnx.GraphDef, policy: TextToImage, sigmas: jax.Array, config: Any):
  """(trainable, frozen, prompt_embeds, pooled, key) -> SDETrajectory of B = len(prompt_embeds)."""
  g = config.grpo

  def rollout(trainable, frozen, prompt_embeds, pooled, key) -> SDETrajectory:
    model = nnx.merge(graphdef, trainable, frozen)
    velocity = policy.velocity(model, prompt_embeds, pooled)
    init_key, sde_key = jax.random.split(key)
    x = initial_noise(init_key, prompt_embeds.shape[0], policy.latent_shape, config)
    window = sde_window(config, sigmas.shape[0] - 1)
    return sample_sde(velocity, x, sigmas, sde_key, noise_level=g.noise_level, sde_window=window)

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


def sde_window(config: Any, num_steps: int) -> tuple[int, int]:
  """The stochastic steps [start, end) of a rollout of `num_steps`: `grpo.sde_window`, or, when
  empty, every step but the last, sharp one (Flow-GRPO's default window).

  Raises:
    ValueError: the window does not lie within the sampling steps.
  """
  if not config.grpo.sde_window:
    return 0, num_steps - 1
  start, end = (int(x) for x in config.grpo.sde_window)
  if not 0 <= start < end <= num_steps:
    raise ValueError(
      f"config.grpo.sde_window=({start}, {end}) must satisfy 0 <= start < end <= "
      f"sampling.num_steps={num_steps}."
    )
  return start, end


def trained_timesteps(config: Any, num_steps: int) -> tuple[int, ...]:
  """The SDE steps that are trained: the first `timestep_fraction` of the stochastic ones, in
  order (Flow-GRPO: 10 steps x 0.99 -> the first 9)."""
  g = config.grpo
  start, end = sde_window(config, num_steps)
  stochastic = list(range(start, end))
  count = int(len(stochastic) * g.timestep_fraction)
  if count < 1:
    raise ValueError(
      f"No timestep to train: {len(stochastic)} stochastic steps (grpo.sde_window="
      f"{g.sde_window}, sampling.num_steps={num_steps}) x grpo.timestep_fraction="
      f"{g.timestep_fraction}."
    )
  return tuple(stochastic[:count])


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
  (the rollout's, "old"), `advantages` (B,), `mask` (B,), `prompt_embeds`, `pooled`.
  """
  g = config.grpo
  sigmas = jnp.asarray(sigmas, jnp.float32)
  js = jnp.asarray(timesteps, jnp.int32)

  def step_at(model: Any, batch: dict[str, jax.Array], j: jax.Array, x: jax.Array):
    velocity = policy.velocity(model, batch["prompt_embeds"], batch["pooled"])
    return sde_step_with_logprob(
      x,
      velocity(x, sigmas[j]),
      sigmas[j],
      sigmas[j + 1],
      g.noise_level,
      sigma_max=sigmas[1],
      prev_sample=batch["latents"][j + 1],
    )

  def loss_at(trainable, frozen, batch, j):
    x = batch["latents"][j]
    model = nnx.merge(graphdef, trainable, frozen)
    _, log_prob, mean, std = step_at(model, batch, j, x)
    ref_mean = None
    if g.beta > 0:
      # The reference policy: the base model, the LoRA layers switched off (no weights copied).
      # It is the policy GRPO started from while the adapters start at B = 0, as here.
      with lora.disabled(model):
        _, _, ref_mean, _ = step_at(model, batch, j, x)
      ref_mean = jax.lax.stop_gradient(ref_mean)
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
    )

  def train_step(trainable, opt_state, frozen, batch):
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
    n = len(timesteps)
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
