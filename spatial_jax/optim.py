"""Optimizers shared by the trainers: AdamW with warmup + cosine decay, clipping, accumulation."""

from __future__ import annotations

from typing import Any

import optax


def adamw_warmup_cosine(train: Any) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping, and accumulation.

  `train` is a config's `train` section: lr, steps, warmup_steps, end_lr_fraction,
  weight_decay, grad_clip and (optional) grad_accum_steps. `steps` and `warmup_steps` count
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
  tx = optax.chain(
    optax.clip_by_global_norm(train.grad_clip),
    optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=train.weight_decay),
  )
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  return tx
