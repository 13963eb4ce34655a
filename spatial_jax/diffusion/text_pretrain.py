"""Pretraining the synthetic world's T5 encoder on the scene grammar: targets, data, heads, probe.

FLUX.1-dev follows spatial relations partly because T5-XXL was pretrained on language; a
random frozen T5 cannot bind a colour word to the relation that places it. The synthetic
world's equivalent is a tiny T5 trained on the grammar so that each object's intended position
is linearly readable from its words' features (`jobs/text_encoder_synthetic.py` runs the training).

The objective is a *parse head*, dropped after training. Objects of a scene have distinct
colours, so each colour word of a prompt names one object. Per object and axis the layout
target is

  (objects that must come before it - objects that must come after it) / (num_objects - 1),

counted in the transitive closure of the scene's relations along the axis (x: "left of" /
"right of"; y: "above" / "below", image y growing downwards): in [-1, 1], 0 when the relations
do not place it. A linear head regresses the targets at every colour token (MSE). An optional
masked-token objective trains the other words' states too: ~15% of the prompt's tokens are
replaced by random grammar tokens (the vocabulary has no mask token) and a linear head predicts
the originals. That pass runs on a corrupted copy of the batch; the parse head reads the clean
one, so a swapped relation word never contradicts its targets.

Prompts are encoded exactly as FLUX reads T5 here (`synthetic.PromptEncoder`): `words <eos>`
padded to max_length, without an attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spatial_jax import optim
from spatial_jax.data import scenes
from spatial_jax.data import tokenizer as tokenizer_lib
from spatial_jax.diffusion import synthetic
from spatial_jax.models.t5 import T5Config, T5EncoderModel
from spatial_jax.models.t5.model import T5Attention

AXES = ("x", "y")
# Ids below this are the special tokens (<pad>, <unk>, <bos>, <eos>, ...); grammar tokens follow.
NUM_SPECIAL = len(tokenizer_lib.SPECIAL_TOKENS)

# --- Layout targets -------------------------------------------------------------------------------


def precedence(num_objects: int, edges: Sequence[tuple[int, int]]) -> np.ndarray:
  """(n, n) bool: [a, b] when a must come before b, in the transitive closure of `edges`."""
  reach = np.zeros((num_objects, num_objects), bool)
  for a, b in edges:
    reach[a, b] = True
  for k in range(num_objects):  # Warshall.
    reach |= reach[:, k : k + 1] & reach[k : k + 1, :]
  return reach


def layout_targets(scene: scenes.Scene) -> np.ndarray:
  """(num_objects, len(AXES)) float32 targets in [-1, 1] (see the module docstring)."""
  n = len(scene.objects)
  out = np.zeros((n, len(AXES)), np.float32)
  for column, axis in enumerate(AXES):
    reach = precedence(n, scenes.axis_edges(scene, axis))
    out[:, column] = (reach.sum(axis=0) - reach.sum(axis=1)) / max(n - 1, 1)
  return out


def colour_token_ids() -> dict[str, int]:
  """Colour name -> its token id in the synthetic vocabulary."""
  vocabulary = tokenizer_lib.vocabulary()
  return {colour: vocabulary.index(colour) for colour in scenes.COLORS}


# --- Data -----------------------------------------------------------------------------------------


def sample_scenes(
  seed: int,
  step: int,
  batch_size: int,
  *,
  min_objects: int = 2,
  max_objects: int = 4,
  max_relations: int = 4,
) -> tuple[list[scenes.Scene], list[str]]:
  """`batch_size` scenes and their prompts, a function of (seed, step) alone."""
  if seed < 0 or step < 0:
    raise ValueError(f"seed and step must be >= 0 (numpy seeds), got seed={seed}, step={step}.")
  rng = np.random.default_rng([seed, step])
  drawn, prompts = [], []
  for _ in range(batch_size):
    scene = scenes.sample_scene(
      rng, min_objects=min_objects, max_objects=max_objects, max_relations=max_relations
    )
    drawn.append(scene)
    prompts.append(scenes.scene_to_prompt(scene, rng))
  return drawn, prompts


def encode_batch(
  drawn: Sequence[scenes.Scene], prompts: Sequence[str], max_length: int, tokenizer: Any = None
) -> dict[str, np.ndarray]:
  """Token ids as the T5 side of `PromptEncoder` makes them, and the parse targets.

  Returns:
    `ids` (B, T) int32; `targets` (B, T, len(AXES)) float32, the layout targets of the object
    each colour token names (0 elsewhere); `target_mask` (B, T) float32, 1 at colour tokens;
    `colour` (B, T) int32, the colour token's index into `scenes.COLORS` (0 elsewhere).
  """
  ids = synthetic.tokenize(prompts, max_length, bos=False, tokenizer=tokenizer)
  targets = np.zeros((*ids.shape, len(AXES)), np.float32)
  mask = np.zeros(ids.shape, np.float32)
  colour = np.zeros(ids.shape, np.int32)
  colours = colour_token_ids()
  names = list(scenes.COLORS)
  for row, scene in enumerate(drawn):
    object_targets = layout_targets(scene)
    for index, obj in enumerate(scene.objects):
      at = ids[row] == colours[obj.color]
      targets[row, at] = object_targets[index]
      mask[row, at] = 1.0
      colour[row, at] = names.index(obj.color)
  return dict(ids=ids, targets=targets, target_mask=mask, colour=colour)


def corrupt(
  ids: np.ndarray, rng: np.random.Generator, rate: float, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Replaces each grammar token with probability `rate` by a random grammar token.

  Returns `(corrupted ids, mask)`, mask (B, T) float32 1 where a token was replaced (padding,
  `<eos>` and other special tokens are never chosen).
  """
  chosen = (ids >= NUM_SPECIAL) & (rng.random(ids.shape) < rate)
  random_tokens = rng.integers(NUM_SPECIAL, vocab_size, ids.shape, dtype=ids.dtype)
  return np.where(chosen, random_tokens, ids), chosen.astype(np.float32)


def make_batch(
  seed: int, step: int, batch_size: int, data: Any, *, mlm_rate: float, tokenizer: Any = None
) -> dict[str, np.ndarray]:
  """The batch of `step`: `encode_batch`'s arrays, plus `mlm_ids` / `mlm_mask` when
  `mlm_rate` > 0. `data` holds max_length, min_objects, max_objects, max_relations."""
  drawn, prompts = sample_scenes(
    seed,
    step,
    batch_size,
    min_objects=data.min_objects,
    max_objects=data.max_objects,
    max_relations=data.max_relations,
  )
  batch = encode_batch(drawn, prompts, data.max_length, tokenizer)
  if mlm_rate > 0:
    # Its own stream (not the scenes'), so the masking rate does not change the prompts.
    rng = np.random.default_rng([seed, step, 1])
    vocab_size = len(tokenizer_lib.vocabulary())
    batch["mlm_ids"], batch["mlm_mask"] = corrupt(batch["ids"], rng, mlm_rate, vocab_size)
  return batch


# --- Model and loss -------------------------------------------------------------------------------


def t5_init(model: T5EncoderModel, position_bias_std: float) -> None:
  """Re-scales a new encoder's initialisation for training from scratch (in place).

  - q as transformers' T5 initialises it, N(0, (d_model * d_kv)^-0.5): T5 has no 1/sqrt(d_kv)
    in its attention and folds it into q instead; our port's generic lecun init leaves it out,
    which starts every softmax saturated on random positions.
  - The relative position bias with std `position_bias_std` (transformers: d_model^-0.5). The
    prompts are padded to 80 tokens and read without a mask, so at a small bias every word
    attends almost uniformly to ~70 padding tokens, and the few words that place an object
    barely reach it: training then sits at the targets' mean for hundreds of steps before
    attention turns local. A wider bias gives each head a distance profile from the start.
  """
  config = model.config
  for _, module in nnx.iter_modules(model):
    if isinstance(module, T5Attention):
      module.q.kernel[...] = module.q.kernel[...] * config.d_kv**-0.5
      if hasattr(module, "relative_attention_bias"):
        table = module.relative_attention_bias.embedding
        table[...] = table[...] * (position_bias_std * config.d_model**0.5)


PARSE_READOUTS = ("linear", "fixed")


class Pretrainer(nnx.Module):
  """The T5 encoder plus the two linear heads of pretraining (dropped at export).

  `parse_readout` says how the parse head reads the targets from the features: `linear`, a
  learned linear head of the layout targets; `fixed`, features of their own at `parse_scale`
  times the targets: the first len(AXES) hold the layout targets and the next len(COLORS) the
  colour token's colour, one-hot. The learned head decodes the layout from a direction of small
  variance, and nothing asks the colour words to keep their colour: trained for the layout
  alone, they lost most of it (`colour_probe_accuracy` on the held-out prompts: 0.41 with the
  learned head, 0.14 with a layout-only fixed readout, 1.00 for the random T5), and a generator
  reading them drew neither the right colours nor layouts (docs/results/generator_text_encoder.md).
  """

  def __init__(
    self,
    config: T5Config,
    *,
    position_bias_std: float = 1.0,
    parse_readout: str = "linear",
    parse_scale: float = 1.0,
    rngs: nnx.Rngs,
  ):
    if parse_readout not in PARSE_READOUTS:
      raise ValueError(f"parse_readout={parse_readout!r}; use one of {PARSE_READOUTS}.")
    if parse_scale <= 0:
      raise ValueError(f"parse_scale must be > 0, got {parse_scale}.")
    self.parse_readout = parse_readout
    self.parse_scale = float(parse_scale)
    self.encoder = T5EncoderModel(config, rngs=rngs)
    t5_init(self.encoder, position_bias_std)

    def head(width: int, names: tuple[str | None, str | None]) -> nnx.Linear:
      return nnx.Linear(
        config.d_model,
        width,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        rngs=rngs,
      )

    self.layout_head = head(len(AXES), ("embed", None))
    self.mlm_head = head(config.vocab_size, ("embed", "vocab"))

  def parse(self, features: jax.Array) -> jax.Array:
    """(B, T, len(AXES)) predicted layout targets from the encoder's features."""
    if self.parse_readout == "fixed":
      return features[..., : len(AXES)] / self.parse_scale
    return self.layout_head(features)

  def colour(self, features: jax.Array) -> jax.Array | None:
    """(B, T, len(COLORS)) the fixed readout's colour code; None for the linear readout."""
    if self.parse_readout != "fixed":
      return None
    return features[..., len(AXES) : len(AXES) + len(scenes.COLORS)] / self.parse_scale


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sign_accuracy(predicted: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Fraction of (token, axis) entries with a nonzero target whose sign is predicted right."""
  valid = mask[..., None] * (targets != 0)
  return _masked_mean((jnp.sign(predicted) == jnp.sign(targets)).astype(jnp.float32), valid)


def loss_fn(
  model: Pretrainer, batch: dict[str, jax.Array], mlm_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Parse-head MSE (+ `mlm_weight` x masked-token cross-entropy when the batch has
  `mlm_ids`), in fp32, and metrics. Also returns the clean features as `aux["features"]`."""
  features = model.encoder(batch["ids"])  # No attention mask: as FLUX reads T5.
  predicted = model.parse(features).astype(jnp.float32)
  mask = batch["target_mask"].astype(jnp.float32)
  squared = jnp.mean(jnp.square(predicted - batch["targets"]), axis=-1)
  parse = _masked_mean(squared, mask)
  aux = dict(parse_loss=parse, parse_sign_accuracy=sign_accuracy(predicted, batch["targets"], mask))
  loss = parse
  colour_code = model.colour(features)
  if colour_code is not None:
    colour_code = colour_code.astype(jnp.float32)
    one_hot = jax.nn.one_hot(batch["colour"], len(scenes.COLORS), dtype=jnp.float32)
    aux["colour_loss"] = _masked_mean(jnp.mean(jnp.square(colour_code - one_hot), axis=-1), mask)
    hit = (jnp.argmax(colour_code, axis=-1) == batch["colour"]).astype(jnp.float32)
    aux["colour_accuracy"] = _masked_mean(hit, mask)
    loss = loss + aux["colour_loss"]
  if "mlm_ids" in batch and mlm_weight > 0:
    logits = model.mlm_head(model.encoder(batch["mlm_ids"])).astype(jnp.float32)
    mlm_mask = batch["mlm_mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"])
    aux["mlm_loss"] = _masked_mean(ce, mlm_mask)
    correct = (jnp.argmax(logits, axis=-1) == batch["ids"]).astype(jnp.float32)
    aux["mlm_accuracy"] = _masked_mean(correct, mlm_mask)
    loss = loss + mlm_weight * aux["mlm_loss"]
  aux["loss"] = loss
  return loss, dict(aux, features=features, predicted=predicted)


def make_optimizer(train: Any) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay and global-norm clipping (`config.train`)."""
  return optim.adamw_warmup_cosine(train)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mlm_weight: float):
  """The pure step: (params, opt_state, rest, batch) -> (params, opt_state, aux).

  `aux["finite"]` says whether the loss, the gradients and the updated parameters are finite.
  """

  def train_step(params, opt_state, rest, batch):
    def objective(params):
      loss, aux = loss_fn(nnx.merge(graphdef, params, rest), batch, mlm_weight)
      del aux["features"], aux["predicted"]  # Not needed out of the step.
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    params, opt_state, checks = optim.apply_gradients(tx, grads, opt_state, params, loss)
    aux.update(checks)
    return params, opt_state, aux

  return train_step


# --- The probe ------------------------------------------------------------------------------------


def ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, float]:
  """Least squares y ~ x @ w + b with an L2 penalty `ridge` x mean feature variance on w (the
  bias is not penalised); fp64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mean_x, mean_y = x.mean(axis=0), y.mean()
  xc = x - mean_x
  gram = xc.T @ xc
  penalty = ridge * np.trace(gram) / max(gram.shape[0], 1)
  w = np.linalg.solve(gram + penalty * np.eye(gram.shape[0]), xc.T @ (y - mean_y))
  return w, float(mean_y - mean_x @ w)


def colour_probe_accuracy(features: np.ndarray, colour: np.ndarray, mask: np.ndarray) -> float:
  """Nearest-class-mean accuracy of each colour token's colour from its frozen features: class
  means fit on the first half of the prompts, scored on the second (split as `probe_accuracy`).
  A colour absent from the first half counts as missed."""
  half = len(features) // 2
  keep = np.asarray(mask) > 0
  x_fit, x_test = features[:half][keep[:half]], features[half:][keep[half:]]
  y_fit, y_test = colour[:half][keep[:half]], colour[half:][keep[half:]]
  if len(x_fit) == 0 or len(x_test) == 0:
    raise ValueError("colour_probe_accuracy: no colour tokens on one side of the split.")
  classes = np.unique(y_fit)
  means = np.stack([x_fit[y_fit == k].mean(axis=0) for k in classes])
  nearest = classes[np.argmin(((x_test[:, None, :] - means[None]) ** 2).sum(axis=-1), axis=1)]
  return float(np.mean(nearest == y_test))


def probe_accuracy(
  features: np.ndarray,
  targets: np.ndarray,
  mask: np.ndarray,
  *,
  ridge: float = 1e-2,
  colour: np.ndarray | None = None,
) -> dict[str, Any]:
  """A linear (ridge) probe of the sign of each axis' target from frozen colour-token features.

  Fit on the first half of the prompts and scored on the second (split by prompt, so no prompt
  is on both sides); only tokens whose object has a nonzero target on the axis count.

  Args:
    features: (N, T, D) encoder states; targets: (N, T, len(AXES)); mask: (N, T) colour tokens.

  Returns:
    `{axis: accuracy, ...}`, their `mean`, and the test tokens per axis under `count_<axis>`;
    with `colour` (B, T), also `colour_probe_accuracy` under `colour`.
  """
  half = len(features) // 2
  if half < 1:
    raise ValueError(f"probe_accuracy needs at least 2 prompts, got {len(features)}.")
  out: dict[str, Any] = {}
  for column, axis in enumerate(AXES):
    keep = (np.asarray(mask) > 0) & (np.asarray(targets)[..., column] != 0)
    x_fit, x_test = features[:half][keep[:half]], features[half:][keep[half:]]
    y_fit = np.sign(targets[:half][keep[:half]][:, column])
    y_test = np.sign(targets[half:][keep[half:]][:, column])
    if len(x_fit) == 0 or len(x_test) == 0:
      raise ValueError(f"probe_accuracy: no colour tokens with a nonzero {axis} target to use.")
    w, b = ridge_fit(x_fit, y_fit, ridge)
    out[axis] = float(np.mean(np.sign(x_test @ w + b) == y_test))
    out[f"count_{axis}"] = len(x_test)
  out["mean"] = float(np.mean([out[axis] for axis in AXES]))
  if colour is not None:
    out["colour"] = colour_probe_accuracy(np.asarray(features), np.asarray(colour), mask)
  return out
