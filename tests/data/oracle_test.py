"""Tests of the pixel oracle: agreement with rendered scenes, rejection of perturbed renders."""

import numpy as np
import pytest

from spatial_jax.data import oracle, perturb, render, scenes
from spatial_jax.data.scenes import Relation, Scene, SceneObject


@pytest.mark.slow
def test_oracle_accepts_renders_and_rejects_perturbed_renders():
  """The synthetic data job's path: 2000 (chosen, rejected) pairs judged on the original prompt."""
  rng = np.random.default_rng(2026)
  agree = reject = 0
  count = 2000
  for k in range(count):
    scene = scenes.sample_scene(rng)
    prompt = scenes.scene_to_prompt(scene, rng)
    perturbed, change = perturb.perturb_scene(scene, rng)
    chosen = render.render_scene(scene, seed=2 * k)
    rejected = render.render_scene(perturbed, seed=2 * k + 1)
    agree += oracle.score_prompt(chosen, prompt).fraction == 1.0
    verdict = oracle.score_prompt(rejected, prompt)
    reject += verdict.fraction < 1.0
    # The changed relation, and only it, fails (the others still hold in the perturbed render).
    assert verdict.satisfied[change.index] is False
    assert sum(verdict.satisfied) == len(scene.relations) - 1
  assert agree / count >= 0.995
  assert reject / count >= 0.99


def _canvas(size=64, gray=128):
  return np.full((size, size, 3), gray, dtype=np.uint8)


def _paint(image, color, x0, y0, x1, y1):
  image[y0:y1, x0:x1] = scenes.COLORS[color]


def test_hand_drawn_image():
  image = _canvas()
  _paint(image, "red", 4, 10, 14, 20)  # area 100
  _paint(image, "blue", 40, 30, 50, 40)
  objects = (SceneObject("square", "red"), SceneObject("square", "blue"))
  relations = tuple(Relation(0, r, 1) for r in scenes.RELATIONS)
  result = oracle.check_scene(image, Scene(objects, relations))
  assert result.satisfied == (True, False, True, False)
  assert result.fraction == 0.5
  assert result.centroids == ((9.0, 15.0), (45.0, 35.0))  # pixels [4, 14) -> centre 9
  assert result.sizes == (10.0, 10.0)


def test_relation_needs_a_margin():
  # Centroids 4 px apart with sizes 10 + 10: below the 0.25 * 20 = 5 px dead zone.
  objects = (SceneObject("square", "red"), SceneObject("square", "blue"))
  scene = Scene(objects, (Relation(0, "left of", 1),))
  image = _canvas()
  _paint(image, "red", 10, 10, 20, 20)
  _paint(image, "blue", 14, 30, 24, 40)
  assert oracle.check_scene(image, scene).satisfied == (False,)
  image = _canvas()
  _paint(image, "red", 10, 10, 20, 20)
  _paint(image, "blue", 16, 30, 26, 40)  # 6 px apart
  assert oracle.check_scene(image, scene).satisfied == (True,)


def test_missing_object_fails_its_relations_only():
  objects = (
    SceneObject("star", "red"),
    SceneObject("circle", "green"),
    SceneObject("cross", "cyan"),
  )
  scene = Scene(objects, (Relation(0, "left of", 1), Relation(2, "above", 1)))
  image = _canvas()
  _paint(image, "red", 2, 40, 12, 50)
  _paint(image, "cyan", 30, 2, 40, 12)
  image[60, 60] = scenes.COLORS["green"]  # a stray pixel is not an object
  result = oracle.check_scene(image, scene)
  assert result.found == (True, False, True)
  assert result.centroids[1] is None
  assert result.satisfied == (False, False) and result.fraction == 0.0
  _paint(image, "green", 40, 40, 50, 50)
  assert oracle.check_scene(image, scene).satisfied == (True, True)


def test_float_images_and_bad_shapes():
  scene = scenes.sample_scene(np.random.default_rng(0))
  image = render.render_scene(scene, seed=1)
  as_uint8 = oracle.check_scene(image, scene)
  as_float = oracle.check_scene(image.astype(np.float32) / 255.0, scene)
  assert as_float.satisfied == as_uint8.satisfied
  np.testing.assert_allclose(as_float.centroids, as_uint8.centroids)
  with pytest.raises(ValueError, match="shape"):
    oracle.check_scene(image[..., 0], scene)


def test_score_prompt_rejects_foreign_prompts():
  with pytest.raises(ValueError, match="outside the scene grammar"):
    oracle.score_prompt(_canvas(), "a cat to the left of a dog")


def test_uint8_batches_label_each_distinct_colour_once_with_the_same_labels():
  # Rendered scenes (palette colours, anti-aliased edges) and noise (every colour distinct):
  # the distinct-colour path labels as the per-pixel arithmetic does.
  rng = np.random.default_rng(3)
  renders = np.stack([render.render_scene(scenes.sample_scene(rng), seed=k) for k in range(4)])
  noise = rng.integers(0, 256, (2, *renders.shape[1:]), dtype=np.uint8)
  for images in (renders, noise, renders[0]):
    per_pixel = oracle._nearest_palette(oracle._as_rgb255(images, batched=images.ndim == 4))
    labels = oracle.color_labels(images)
    assert labels.dtype == per_pixel.dtype
    np.testing.assert_array_equal(labels, per_pixel)
  assert (oracle.color_labels(renders) >= 0).any()
  with pytest.raises(ValueError, match="shape"):
    oracle.color_labels(np.zeros((64, 64, 4), np.uint8))
