"""Flow-matching training of the FLUX transformer: timesteps, the rectified-flow loss, object
weights and the jittable train step (what `jobs/flux_sft.py` runs).

Per example, t is drawn by `config.train.timestep_sampling` (`logit_normal`: SD3's sigmoid of
N(mean, std); or `uniform`), optionally shifted by the schedule's resolution-dependent mu as the
sampler's sigmas are; with noise ~ N(0, 1),

  x_t = (1 - t) x0 + t noise,   target = noise - x0,   loss = mean((v(x_t, t) - target)^2),

the rectified-flow objective whose velocity the Euler sampler integrates from t = 1 to 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spatial_jax import optim, sharding
from spatial_jax.data import oracle
from spatial_jax.diffusion import synthetic
from spatial_jax.diffusion.generator import Embeds, Geometry, images_to_unit, velocity_fn
from spatial_jax.diffusion.latents import pack
from spatial_jax.diffusion.schedule import FlowMatchSchedule

TIMESTEP_SAMPLING = ("logit_normal", "uniform")
_TOKENS = ("act_batch", None, None)


def sample_timesteps(key: jax.Array, batch: int, config: Any, image_seq_len: int) -> jax.Array:
  """(batch,) fp32 flow times t in [0, 1] (1 = pure noise) by `config.train`'s scheme."""
  t = config.train
  if t.timestep_sampling == "logit_normal":
    u = jax.nn.sigmoid(t.logit_mean + t.logit_std * jax.random.normal(key, (batch,), jnp.float32))
  elif t.timestep_sampling == "uniform":
    u = jax.random.uniform(key, (batch,), jnp.float32)
  else:
    raise ValueError(
      f"config.train.timestep_sampling={t.timestep_sampling!r}; use one of {TIMESTEP_SAMPLING}."
    )
  if t.resolution_shift:
    # The sampler's sigma shift e^mu / (e^mu + (1/t - 1)), so training sees the sigmas it samples.
    shift = np.exp(FlowMatchSchedule().mu(image_seq_len))
    u = shift * u / (1 + (shift - 1) * u)
  return u


def flow_matching_loss(
  velocity: Callable[[jax.Array, jax.Array], jax.Array],
  x0: jax.Array,
  noise: jax.Array,
  t: jax.Array,
  weights: jax.Array | None = None,
) -> jax.Array:
  """mean((velocity(x_t, t) - (noise - x0))^2) with x_t = (1 - t) x0 + t noise, in fp32.

  x0 and noise are packed latents (B, N, C); t is (B,). With `weights` (B, N, C), the weighted
  mean sum(w * err^2) / sum(w).
  """
  x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
  tt = t.astype(jnp.float32)[:, None, None]
  x_t = (1 - tt) * x0 + tt * noise
  predicted = velocity(x_t, t).astype(jnp.float32)
  error = jnp.square(predicted - (noise - x0))
  if weights is None:
    return jnp.mean(error)
  weights = jnp.broadcast_to(weights.astype(jnp.float32), error.shape)
  return jnp.sum(weights * error) / jnp.sum(weights)


def object_weights(images: np.ndarray, object_weight: float) -> np.ndarray:
  """Per-pixel loss weights (B, H, W, 1): `object_weight` on the scene's objects (pixels the
  oracle gives a palette colour), 1 on the background.

  The objects cover a few percent of a synthetic image and the textured background the rest,
  so in the plain loss the prompt (which says only what the objects are) decides a few percent
  of the error, and a small model learns the background long before it learns to follow the
  prompt. Weighting the objects up makes the conditional part of the loss count.
  """
  labels = np.stack([oracle.color_labels(image) for image in images])
  return np.where(labels >= 0, object_weight, 1.0).astype(np.float32)[..., None]


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  config: Any,
  codec: synthetic.PixelCodec,
  geo: Geometry,
  negative: Embeds | None = None,
  t5_graphdef: nnx.GraphDef | None = None,
):
  """The pure step: (trainable, opt_state, frozen, batch, key) -> (trainable, opt_state, aux).

  `batch` holds `images` (B, H, W, 3) uint8, `prompt_embeds` (B, T, D) and `pooled` (B, P).
  With `train.prompt_dropout` = p > 0, each example's prompt is replaced by the empty prompt's
  embeddings `negative` (batch 1) with probability p, which teaches the unconditional velocity
  classifier-free guidance needs. `aux["finite"]` says whether the loss, the gradients and the
  updated parameters are finite.

  With `t5_graphdef` (`text.t5_trainable`), T5 trains with the transformer: `trainable` is
  `{"transformer": ..., "t5": ...}`, `batch` holds T5's `t5_ids` (B, T) instead of
  `prompt_embeds`, and `negative` is the empty prompt's `(t5_ids (1, T), pooled (1, P))`.
  """
  dropout = float(config.train.prompt_dropout)
  if dropout > 0 and negative is None:
    raise ValueError("train.prompt_dropout > 0 needs the empty prompt's embeddings (negative).")
  text_key = "prompt_embeds" if t5_graphdef is None else "t5_ids"

  def train_step(trainable, opt_state, frozen, batch, key):
    t_key, noise_key, drop_key = jax.random.split(key, 3)
    x0 = pack(codec.scale_latents(codec.encode(images_to_unit(batch["images"])).mode()))
    x0 = sharding.shard(x0, _TOKENS)
    weights = None
    if "weights" in batch:  # Pixel weights take the pixels' path into tokens (a reshape).
      pixel_weights = jnp.broadcast_to(batch["weights"], batch["images"].shape)
      weights = pack(codec.encode(pixel_weights).mode())
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    t = sample_timesteps(t_key, x0.shape[0], config, geo.image_seq_len)
    text, pooled = batch[text_key], batch["pooled"]
    if dropout > 0:
      drop = jax.random.bernoulli(drop_key, dropout, (x0.shape[0],))
      text = jnp.where(drop.reshape((-1,) + (1,) * (text.ndim - 1)), negative[0], text)
      pooled = jnp.where(drop[:, None], negative[1], pooled)

    def objective(trainable):
      if t5_graphdef is None:
        model, prompt_embeds = nnx.merge(graphdef, trainable, frozen), text
      else:
        model = nnx.merge(graphdef, trainable["transformer"], frozen)
        prompt_embeds = nnx.merge(t5_graphdef, trainable["t5"])(text)
      velocity = velocity_fn(
        model,
        prompt_embeds,
        pooled,
        geo.img_ids,
        geo.txt_ids,
        config.train.guidance,
      )
      return flow_matching_loss(velocity, x0, noise, t, weights)

    loss, grads = jax.value_and_grad(objective)(trainable)
    trainable, opt_state, checks = optim.apply_gradients(tx, grads, opt_state, trainable, loss)
    aux = dict(loss=loss, t_mean=jnp.mean(t), **checks)
    return trainable, opt_state, aux

  return train_step
