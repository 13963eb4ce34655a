"""The SpatialScore train step: the Bradley-Terry preference loss (+ perturbed-prompt and
colour-grounding terms) of one `build.PairBatch`, and the jittable update around it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from spatial_jax import optim
from spatial_jax.models.qwen25vl import ModelInputs
from spatial_jax.reward import grounding, losses
from spatial_jax.reward.build import PairBatch


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping, and accumulation."""
  return optim.adamw_warmup_cosine(config.train)


def loss_fn(
  model,
  batch: PairBatch | ModelInputs,
  key: jax.Array,
  config: Any,
  colour_ids=None,
  image_places: tuple[int, tuple[int, int]] | None = None,
):
  """The preference loss (+ the colour-grounding auxiliary) of one batch, and its metrics.

  Two rows per pair: the configured loss on (chosen, rejected) under the prompt. Four rows
  (`perturbed_pairs`): also the mirrored pair under the perturbed prompt, where the rejected
  image is the right one, averaged with the first; plus `text_contrast_weight` times the loss
  of each image preferring the prompt it was made for, which holds the image fixed and so
  asks the model to read the changed relation in the text.

  `image_places` = (image token id, merged grid (rows, columns)) adds
  `grounding_image_weight` times `grounding.image_place_loss` (with the grounding loss on).
  """
  if isinstance(batch, ModelInputs):
    batch = PairBatch(batch)
  grounding_on = batch.centroids is not None and colour_ids is not None
  image_weight = config.train.get("grounding_image_weight", 0.0)
  if grounding_on and image_places is not None and image_weight > 0:
    mu, sigma, hidden, embeds = model.forward_with_embeds(batch.inputs)
  else:
    (mu, sigma, hidden), embeds = model.forward(batch.inputs), None
  mu, sigma = mu.reshape(-1, batch.rows_per_pair).T, sigma.reshape(-1, batch.rows_per_pair).T
  pair_loss = losses.get_loss(config.loss)
  keys = jax.random.split(key, 4)

  def prefer(w, lose, k):  # Rows w over rows lose.
    return pair_loss(
      mu[w], sigma[w], mu[lose], sigma[lose], key=keys[k], num_samples=config.mc_samples
    )

  loss = main = prefer(0, 1, 0)
  aux = dict(accuracy=losses.pairwise_accuracy(mu[0], mu[1]), margin=jnp.mean(mu[0] - mu[1]))
  if batch.rows_per_pair == 4:
    text = (prefer(0, 2, 2) + prefer(3, 1, 3)) / 2
    loss = (main + prefer(3, 2, 1)) / 2 + config.train.get("text_contrast_weight", 1.0) * text
    aux["text_contrast_loss"] = text
  aux["preference_loss"] = main
  if grounding_on:
    inputs = batch.inputs
    axis_errors = grounding.centroid_axis_errors(
      model.grounding_head(hidden),
      inputs.input_ids,
      inputs.attention_mask,
      colour_ids,
      batch.centroids,
      batch.present,
    )
    ground = jnp.sum(axis_errors)
    loss = loss + config.train.grounding_weight * ground
    aux.update(grounding_loss=ground, grounding_x=axis_errors[0], grounding_y=axis_errors[1])
    if embeds is not None:
      image_token_id, grid = image_places
      place = grounding.image_place_loss(
        model.grounding_head(embeds), inputs.input_ids, image_token_id, grid
      )
      loss = loss + image_weight * place
      aux["grounding_image_loss"] = place
  aux.update(loss=loss, sigma=jnp.mean(sigma))
  return loss, aux


def image_place_spec(model_config, image_size: int) -> tuple[int, tuple[int, int]]:
  """(image token id, merged grid) of the square `image_size` images a synthetic batch holds."""
  v = model_config.vision
  side = image_size // (v.patch_size * v.spatial_merge_size)
  return model_config.image_token_id, (side, side)


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  config: Any,
  key: jax.Array,
  colour_ids=None,
  image_places: tuple[int, tuple[int, int]] | None = None,
):
  """The pure step: (trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, aux).

  `batch` is a `PairBatch` (or plain two-rows-per-pair `ModelInputs`); `colour_ids`
  (`grounding.colour_token_ids`) enables the grounding loss on batches that carry its targets.

  The loss's random samples use `fold_in(key, step)`, so a resumed run draws exactly what
  an uninterrupted one would. `aux["finite"]` says whether the loss, the gradients and the
  updated parameters are all finite (checked on the host before anything is saved).
  """

  def train_step(trainable, opt_state, frozen, inputs, step):
    step_key = jax.random.fold_in(key, step)

    def objective(trainable):
      model = nnx.merge(graphdef, trainable, frozen)
      return loss_fn(model, inputs, step_key, config, colour_ids, image_places)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    trainable, opt_state, checks = optim.apply_gradients(tx, grads, opt_state, trainable, loss)
    aux.update(checks)
    return trainable, opt_state, aux

  return train_step
