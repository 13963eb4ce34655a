"""Tests of the layout solver and renderer."""

import numpy as np
import pytest

from spatial_jax.data import oracle, render, scenes
from spatial_jax.data.scenes import Relation, Scene, SceneObject


def _chain_scene():
  """Four objects in a chain along both axes: the tightest layout the grammar can ask for."""
  objects = tuple(
    SceneObject(s, c)
    for s, c in zip(scenes.SHAPES[:4], ("red", "blue", "green", "cyan"), strict=True)
  )
  relations = tuple(Relation(k, "left of", k + 1) for k in range(3)) + (Relation(3, "below", 0),)
  return Scene(objects, relations)


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_layout_keeps_margins_and_no_overlap(size):
  rng = np.random.default_rng(size)
  gap = max(1.0, 0.03 * size)
  for k in range(100):
    scene = _chain_scene() if k == 0 else scenes.sample_scene(rng)
    boxes = render.solve_layout(scene, size, rng)
    lo, hi = boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2
    assert lo.min() >= 0 and hi.max() <= size
    for r in scene.relations:
      s, o = r.subject, r.object
      separation = {
        "left of": lo[o, 0] - hi[s, 0],
        "right of": lo[s, 0] - hi[o, 0],
        "above": lo[o, 1] - hi[s, 1],
        "below": lo[s, 1] - hi[o, 1],
      }[r.relation]
      assert separation >= gap - 1e-9
    for a in range(len(boxes)):
      for b in range(a + 1, len(boxes)):
        apart = (lo[a] >= hi[b]) | (lo[b] >= hi[a])
        assert apart.any(), (scene, boxes)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_shape_and_every_object_visible(size):
  rng = np.random.default_rng(1)
  for seed in range(20):
    scene = _chain_scene() if seed == 0 else scenes.sample_scene(rng)
    image = render.render_scene(scene, size=size, seed=seed)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    result = oracle.check_scene(image, scene)
    assert all(result.found) and result.fraction == 1.0


def test_render_is_deterministic_per_seed_and_varies_across_seeds():
  scene = scenes.sample_scene(np.random.default_rng(3), min_objects=3)
  first = render.render_scene(scene, seed=7)
  np.testing.assert_array_equal(first, render.render_scene(scene, seed=7))
  others = [render.render_scene(scene, seed=s) for s in range(8, 14)]
  for other in others:
    assert np.mean(first != other) > 0.5  # background and layout both change
  # Object positions (not only the noise) move between seeds.
  centroids = [oracle.check_scene(im, scene).centroids[0] for im in [first, *others]]
  assert np.ptp(np.array(centroids), axis=0).min() > 5


def test_backgrounds_stay_off_the_palette():
  rng = np.random.default_rng(0)
  for _ in range(200):
    background = np.clip(np.rint(render._background(rng, 64)), 0, 255).astype(np.uint8)
    assert (oracle.color_labels(background) == -1).all()
    spread = background.max(axis=-1).astype(int) - background.min(axis=-1)
    assert spread.max() < 90  # low saturation; palette colours spread >= 150


def test_contradictory_or_tiny_scenes_raise():
  objects = (SceneObject("circle", "red"), SceneObject("square", "blue"))
  contradictory = Scene(objects, (Relation(0, "left of", 1), Relation(0, "right of", 1)))
  with pytest.raises(ValueError, match="contradictory"):
    render.render_scene(contradictory)
  with pytest.raises(ValueError, match="at least 16"):
    render.render_scene(_chain_scene(), size=8)
  with pytest.raises(ValueError, match="Cannot fit"):
    render.render_scene(_chain_scene(), size=16)


def test_layout_candidates_keep_the_most_separated_layout():
  rng = np.random.default_rng(3)
  gaps = {1: [], 8: []}
  for i in range(40):
    scene = scenes.sample_scene(rng, min_objects=2, max_objects=3, max_relations=2)
    for k in gaps:
      boxes = render.solve_layout(scene, 32, np.random.default_rng(i), k)
      gaps[k].append(render._smallest_relation_gap(scene, boxes))
    # The first of the k draws is the k = 1 layout, so the kept one is never closer.
    assert gaps[8][-1] >= gaps[1][-1]
    image = render.render_scene(scene, size=32, seed=i, layout_candidates=8)
    assert oracle.check_scene(image, scene).fraction == 1.0
  assert np.mean(gaps[8]) > np.mean(gaps[1]) + 3.0  # Pixels, at 32 x 32.
  # One candidate is the renderer's own draw, bit for bit.
  assert np.array_equal(
    render.render_scene(scene, size=32, seed=5, layout_candidates=1),
    render.render_scene(scene, size=32, seed=5),
  )
  with pytest.raises(ValueError, match="candidates"):
    render.solve_layout(scene, 32, np.random.default_rng(0), 0)
