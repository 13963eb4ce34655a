"""Optimizers shared by the trainers: AdamW with warmup + cosine decay, clipping, accumulation,
and an EMA of the parameters kept in the optimizer state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def adamw_warmup_cosine(train: Any) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping, and accumulation.

  `train` is a config's `train` section: lr, steps, warmup_steps, end_lr_fraction,
  weight_decay, grad_clip and (optional) grad_accum_steps, adam_eps (optax's 1e-8 by default)
  and ema_decay (> 0: `params_ema` after the update, whose parameters `ema_params` reads back). `steps` and `warmup_steps` count
  micro-batches; the schedule counts optimizer updates.
  """
  k = max(1, train.get("grad_accum_steps", 1))
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=train.lr,
    warmup_steps=train.warmup_steps // k,
    decay_steps=max(train.steps // k, train.warmup_steps // k + 1),
    end_value=train.lr * train.end_lr_fraction,
  )
  parts = [
    optax.clip_by_global_norm(train.grad_clip),
    optax.adamw(
      schedule, b1=0.9, b2=0.999, eps=train.get("adam_eps", 1e-8), weight_decay=train.weight_decay
    ),
  ]
  if train.get("ema_decay", 0.0) > 0:
    parts.append(params_ema(train.ema_decay))
  tx = optax.chain(*parts)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  return tx


class ParamsEMAState(NamedTuple):
  """The exponential moving average of the parameters, kept in the optimizer state (so it is
  checkpointed and restored with it)."""

  count: jax.Array
  ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
  """Tracks an EMA of the parameters after each update; passes the updates through unchanged.

  Sampling from the EMA is the usual way to get clean samples from a diffusion model whose
  weights still move with every noisy step. The decay ramps up as min(decay, (1 + n) / (10 + n))
  over the n-th update, so a short run is not dominated by the initial weights.
  """

  def init(params):
    return ParamsEMAState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

  def update(updates, state, params):
    if params is None:
      raise ValueError("params_ema needs the parameters: tx.update(grads, state, params).")
    count = state.count + 1
    d = jnp.minimum(decay, (1.0 + count) / (10.0 + count))
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(e.dtype), state.ema, new_params)
    return updates, ParamsEMAState(count, ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any | None:
  """The EMA parameters held in an optimizer state (e.g. `adamw_warmup_cosine`'s), or None."""
  is_ema = lambda x: isinstance(x, ParamsEMAState)  # noqa: E731
  states = [x for x in jax.tree.leaves(opt_state, is_leaf=is_ema) if is_ema(x)]
  return states[0].ema if states else None


def apply_gradients(
  tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any, loss: jax.Array
) -> tuple[Any, Any, dict[str, jax.Array]]:
  """One update of `params` by `tx`; returns (params, opt_state, {grad_norm, finite}), where
  `finite` says whether the loss, the gradients and the updated parameters are all finite (the
  trainers check it on the host before anything is saved)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
  return params, opt_state, dict(grad_norm=grad_norm, finite=finite)
