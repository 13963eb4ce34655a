"""Tests of the scene grammar: sampling, prompts, parsing."""

import collections

import numpy as np
import pytest

from spatial_jax.data import scenes
from spatial_jax.data.scenes import Relation, Scene, SceneObject


def _scenes(count, seed=0, **kwargs):
  rng = np.random.default_rng(seed)
  return [(scenes.sample_scene(rng, **kwargs), rng) for _ in range(count)]


def test_palette_and_relations():
  assert len(scenes.SHAPES) >= 5 and len(scenes.COLORS) >= 6
  colors = np.array(list(scenes.COLORS.values()), dtype=float)
  distances = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
  assert distances[np.triu_indices(len(colors), 1)].min() >= 80
  # Saturated: every palette colour spans >= 150 between its largest and smallest channel.
  assert (colors.max(axis=1) - colors.min(axis=1)).min() >= 150
  assert scenes.RELATIONS == ("left of", "right of", "above", "below")
  assert [scenes.RELATION_TYPES[r] for r in scenes.RELATIONS] == [
    "horizontal",
    "horizontal",
    "vertical",
    "vertical",
  ]


def test_sample_scene_properties():
  sizes = collections.Counter()
  for scene, _ in _scenes(1000):
    n = len(scene.objects)
    assert 2 <= n <= 4 and 1 <= len(scene.relations) <= 4
    assert len({o.color for o in scene.objects}) == n
    assert {i for r in scene.relations for i in (r.subject, r.object)} == set(range(n))
    assert scenes.is_consistent(scene)
    # One relation per object pair and axis at most (no duplicates, no contradictions).
    slots = [
      (min(r.subject, r.object), max(r.subject, r.object), scenes.RELATION_TYPES[r.relation])
      for r in scene.relations
    ]
    assert len(set(slots)) == len(slots)
    assert scene == scene.canonical()
    sizes[len(scene.relations)] += 1
  # A mix of short (one relation) and long (3-4 relations) prompts.
  assert sizes[1] >= 150 and sizes[3] + sizes[4] >= 300


def test_sample_scene_respects_limits():
  for scene, _ in _scenes(200, min_objects=3, max_objects=3, max_relations=2):
    assert len(scene.objects) == 3 and len(scene.relations) == 2
  with pytest.raises(ValueError, match="max_objects"):
    scenes.sample_scene(np.random.default_rng(0), max_objects=9)


def test_round_trip_and_variety():
  prompts = set()
  sentence_counts = collections.Counter()
  for scene, rng in _scenes(1000, seed=1):
    prompt = scenes.scene_to_prompt(scene, rng)
    assert scenes.parse_prompt(prompt) == scene, prompt
    prompts.add(prompt)
    sentence_counts[min(prompt.count("."), 4)] += 1
  assert len(prompts) >= 990  # templates vary
  assert sentence_counts[4] >= 100  # long prompts have several sentences


def test_round_trip_of_non_canonical_scene():
  objects = (
    SceneObject("star", "red"),
    SceneObject("circle", "blue"),
    SceneObject("cross", "green"),
  )
  scene = Scene(objects, (Relation(2, "above", 0), Relation(1, "left of", 2)))
  prompt = scenes.scene_to_prompt(scene, np.random.default_rng(0))
  parsed = scenes.parse_prompt(prompt)
  assert parsed == scene.canonical()
  assert [o.name for o in parsed.objects] == ["green cross", "red star", "blue circle"]


@pytest.mark.parametrize(
  "prompt, expected",
  [
    ("a red circle left of a blue square", [("red circle", "left of", "blue square")]),
    ("To the left of a blue square is a red circle.", [("red circle", "left of", "blue square")]),
    ("Beneath the green star sits an orange cross.", [("orange cross", "below", "green star")]),
    (
      "There are three objects: a red circle, a blue square and a green star. The red circle is "
      "over the blue square and on the right side of the green star.",
      [("red circle", "above", "blue square"), ("red circle", "right of", "green star")],
    ),
    (
      "A cyan diamond lies lower than a purple triangle, while the purple triangle is right of a "
      "yellow cross.",
      [
        ("cyan diamond", "below", "purple triangle"),
        ("purple triangle", "right of", "yellow cross"),
      ],
    ),
  ],
)
def test_parse_examples(prompt, expected):
  scene = scenes.parse_prompt(prompt)
  got = [
    (scene.objects[r.subject].name, r.relation, scene.objects[r.object].name)
    for r in scene.relations
  ]
  assert got == expected


@pytest.mark.parametrize(
  "prompt, message",
  [
    ("a red circle left of a pink square", "outside the scene grammar"),
    ("a red circle and a blue square", "no spatial relation"),
    ("a red left of a blue square", "not followed by a shape"),
    ("a circle left of a blue square", "has no colour"),
    ("a red circle left of a red square", "distinct colours"),
    ("a red circle left of above a blue square", "Cannot read clause"),
    ("a red circle left of a red circle", "to itself"),
  ],
)
def test_parse_errors(prompt, message):
  with pytest.raises(ValueError, match=message):
    scenes.parse_prompt(prompt)


def test_consistency_detects_cycles():
  objects = tuple(SceneObject("circle", c) for c in ("red", "blue", "green"))
  chain = (Relation(0, "left of", 1), Relation(1, "left of", 2))
  assert scenes.is_consistent(Scene(objects, (*chain, Relation(0, "left of", 2))))
  assert not scenes.is_consistent(Scene(objects, (*chain, Relation(0, "right of", 2))))
  assert not scenes.is_consistent(Scene(objects, (*chain, Relation(2, "left of", 0))))
  # Vertical relations do not constrain the horizontal order.
  assert scenes.is_consistent(Scene(objects, (*chain, Relation(2, "above", 0))))
  assert not scenes.is_consistent(
    Scene(objects[:2], (Relation(0, "above", 1), Relation(0, "below", 1)))
  )
