"""Colour grounding targets and loss, and the four-rows-per-pair preference loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatial_jax.configs_lib import load_config
from spatial_jax.data import scenes
from spatial_jax.data import tokenizer as tok_lib
from spatial_jax.reward import build, grounding
from spatial_jax.reward import step as reward_step


def test_colour_centroids_of_hand_drawn_squares():
  images = np.full((2, 8, 8, 3), 128, np.uint8)  # Grey: no palette colour.
  images[0, 0:2, 6:8] = scenes.COLORS["red"]  # Top right 2x2 pixels.
  images[1, 4:8, 0:2] = scenes.COLORS["blue"]
  centroids, present = grounding.colour_centroids(images)
  red, blue = grounding.COLOURS.index("red"), grounding.COLOURS.index("blue")
  assert present.sum() == 2 and present[0, red] and present[1, blue]
  to_unit = lambda pixel: (pixel + 0.5) / 8 * 2 - 1  # noqa: E731
  np.testing.assert_allclose(centroids[0, red], [to_unit(6.5), to_unit(0.5)], atol=1e-6)
  np.testing.assert_allclose(centroids[1, blue], [to_unit(0.5), to_unit(5.5)], atol=1e-6)
  assert not centroids[0, blue].any()


def test_centroid_loss_matches_numpy():
  rng = np.random.default_rng(0)
  colour_ids = np.array([10, 11, 12], np.int32)
  ids = rng.choice([1, 2, 10, 11, 12], size=(3, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[:, 5:] = 0  # Padding: a colour id there must not count.
  centroids = rng.uniform(-1, 1, (3, 3, 2)).astype(np.float32)
  present = rng.random((3, 3)) < 0.7
  predicted = rng.normal(size=(3, 7, 2)).astype(np.float32)
  errors = []
  for n in range(3):
    for t in range(5):
      if ids[n, t] in colour_ids:
        c = int(np.flatnonzero(colour_ids == ids[n, t])[0])
        if present[n, c]:
          errors.append(((predicted[n, t] - centroids[n, c]) ** 2).sum())
  got = grounding.centroid_loss(predicted, ids, mask, colour_ids, centroids, present)
  np.testing.assert_allclose(got, np.mean(errors), rtol=1e-6)


def test_colour_ids_need_a_token_per_colour(tmp_path):
  tok_lib.save_tokenizer(str(tmp_path))
  tok = tok_lib.load_tokenizer(str(tmp_path))
  ids = grounding.colour_token_ids(tok)
  assert [tok.convert_ids_to_tokens(int(i)) for i in ids] == list(grounding.COLOURS)

  class NoColours:
    unk_token_id = 1

    def convert_tokens_to_ids(self, token):
      return 1

  with pytest.raises(ValueError, match="grounding_weight"):
    grounding.colour_token_ids(NoColours())


@dataclasses.dataclass
class _FixedScores:
  """Stands in for SpatialScoreModel: returns given (mu, sigma)."""

  mu: jax.Array
  sigma: jax.Array

  def forward(self, inputs):
    return self.mu, self.sigma, jnp.zeros((self.mu.shape[0], 1, 1))


def _bt(w, lose):
  return np.mean(np.log1p(np.exp(-(w - lose))))


def test_four_rows_per_pair_loss_matches_numpy():
  config = load_config("configs/reward_synthetic.py", "smoke")
  config.loss = "bt"
  config.train.text_contrast_weight = 0.5
  mu = np.random.default_rng(1).normal(size=12).astype(np.float32)  # 3 pairs x 4 rows
  rows = mu.reshape(3, 4).T  # (C,P), (R,P), (C,P'), (R,P')
  inputs = build.ModelInputs(
    input_ids=jnp.zeros((12, 1), jnp.int32), attention_mask=None, position_ids=None
  )
  batch = build.PairBatch(inputs, rows_per_pair=4)
  loss, aux = reward_step.loss_fn(
    _FixedScores(jnp.asarray(mu), jnp.ones(12)), batch, jax.random.key(0), config
  )
  main, mirror = _bt(rows[0], rows[1]), _bt(rows[3], rows[2])
  text = (_bt(rows[0], rows[2]) + _bt(rows[3], rows[1])) / 2
  np.testing.assert_allclose(loss, (main + mirror) / 2 + 0.5 * text, rtol=1e-5)
  np.testing.assert_allclose(aux["preference_loss"], main, rtol=1e-5)
  np.testing.assert_allclose(aux["accuracy"], np.mean(rows[0] > rows[1]))
  # Two rows per pair: the plain loss on consecutive rows.
  loss2, _ = reward_step.loss_fn(
    _FixedScores(jnp.asarray(mu), jnp.ones(12)), batch.inputs, jax.random.key(0), config
  )
  np.testing.assert_allclose(loss2, _bt(mu[0::2], mu[1::2]), rtol=1e-5)


def test_four_row_batches_pair_each_image_with_its_centroids():
  config = load_config("configs/reward_synthetic.py", "smoke")
  rng = np.random.default_rng(0)
  # Grey noise (far from every palette colour) with a green square at opposite corners.
  chosen = rng.integers(120, 136, (2, 8, 8, 3), dtype=np.uint8)
  rejected = rng.integers(120, 136, (2, 8, 8, 3), dtype=np.uint8)
  chosen[:, :2, :2] = scenes.COLORS["green"]
  rejected[:, 6:, 6:] = scenes.COLORS["green"]
  batch = dict(chosen=chosen, rejected=rejected, prompt=["p0", "p1"], perturbed_prompt=["q0", "q1"])

  def preparer(images, prompts):  # Records the rows instead of tokenising them.
    return build.ModelInputs(
      input_ids=(np.stack(images), prompts), attention_mask=None, position_ids=None
    )

  host = build.host_pair_batch(preparer, batch, config)
  images, prompts = host.inputs.input_ids
  assert host.rows_per_pair == 4
  assert prompts == ["p0", "p0", "q0", "q0", "p1", "p1", "q1", "q1"]
  expected = [chosen[0], rejected[0]] * 2 + [chosen[1], rejected[1]] * 2
  np.testing.assert_array_equal(images, np.stack(expected))
  np.testing.assert_array_equal(host.centroids, grounding.colour_centroids(images)[0])
  green = grounding.COLOURS.index("green")
  assert (host.centroids[0::2, green] < 0).all() and (host.centroids[1::2, green] > 0).all()


def test_image_token_places_row_major():
  # <bos> then a 2x3 merged grid of image tokens (id 4), then text; a second row with padding.
  ids = np.array([[1, 4, 4, 4, 4, 4, 4, 9, 9], [1, 9, 4, 4, 4, 4, 4, 4, 0]], np.int32)
  places, is_image = grounding.image_token_places(jnp.asarray(ids), 4, (2, 3))
  assert is_image.sum() == 12
  xs = (np.arange(3) + 0.5) / 3 * 2 - 1
  ys = (np.arange(2) + 0.5) / 2 * 2 - 1
  want = np.stack(np.meshgrid(xs, ys), -1).reshape(6, 2)  # Row-major (x, y).
  np.testing.assert_allclose(places[0, 1:7], want, atol=1e-6)
  np.testing.assert_allclose(places[1, 2:8], want, atol=1e-6)
  assert not np.asarray(places[0, 7:]).any() and not np.asarray(places[1, :2]).any()
  predicted = jnp.zeros((2, 9, 2))
  loss = grounding.image_place_loss(predicted, jnp.asarray(ids), 4, (2, 3))
  np.testing.assert_allclose(loss, np.mean((want**2).sum(-1)), rtol=1e-6)
