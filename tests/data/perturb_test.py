"""Tests of the relation perturbers (synthetic scenes and free-form English)."""

import collections

import numpy as np
import pytest

from spatial_jax.data import perturb, scenes
from spatial_jax.data.scenes import Relation, Scene, SceneObject


def test_perturb_scene_changes_exactly_one_relation():
  rng = np.random.default_rng(0)
  kinds, types = collections.Counter(), collections.Counter()
  for _ in range(1000):
    scene = scenes.sample_scene(rng)
    perturbed, change = perturb.perturb_scene(scene, rng)
    assert perturbed.objects == scene.objects
    differing = [
      k for k, (a, b) in enumerate(zip(scene.relations, perturbed.relations, strict=True)) if a != b
    ]
    assert differing == [change.index]
    assert change.before == scene.relations[change.index]
    assert change.after == perturbed.relations[change.index]
    before, after = change.before, change.after
    if change.kind == "flip":
      assert (after.subject, after.object) == (before.subject, before.object)
      assert after.relation == scenes.OPPOSITE[before.relation]
    else:
      assert change.kind == "swap"
      assert (after.subject, after.object, after.relation) == (
        before.object,
        before.subject,
        before.relation,
      )
    assert change.type == scenes.RELATION_TYPES[before.relation]
    assert scenes.is_consistent(perturbed)
    kinds[change.kind] += 1
    types[change.type] += 1
  assert min(kinds.values()) >= 400 and min(types.values()) >= 400


def test_perturb_scene_never_reverses_an_implied_relation():
  objects = tuple(SceneObject("square", c) for c in ("red", "blue", "green"))
  # Reversing only "red left of green" would contradict the chain red < blue < green.
  scene = Scene(
    objects, (Relation(0, "left of", 1), Relation(1, "left of", 2), Relation(0, "left of", 2))
  )
  rng = np.random.default_rng(0)
  indices = collections.Counter(perturb.perturb_scene(scene, rng)[1].index for _ in range(200))
  assert set(indices) == {0, 1}


def test_perturb_scene_is_deterministic():
  scene = scenes.sample_scene(np.random.default_rng(5), min_objects=4)
  first = perturb.perturb_scene(scene, np.random.default_rng(9))
  assert perturb.perturb_scene(scene, np.random.default_rng(9)) == first


def test_perturb_scene_many_reverses_distinct_relations_and_stays_satisfiable():
  rng = np.random.default_rng(1)
  counts = collections.Counter()
  for _ in range(500):
    scene = scenes.sample_scene(rng, min_objects=3, max_objects=4, max_relations=4)
    perturbed, changes = perturb.perturb_scene_many(scene, rng, 3)
    indices = [c.index for c in changes]
    assert 1 <= len(changes) <= min(3, len(scene.relations))
    assert len(set(indices)) == len(indices)
    differing = [
      k for k, (a, b) in enumerate(zip(scene.relations, perturbed.relations, strict=True)) if a != b
    ]
    assert differing == sorted(indices)
    for change in changes:
      assert change.before == scene.relations[change.index]
      assert change.after == perturbed.relations[change.index]
    assert scenes.is_consistent(perturbed)
    counts[len(changes)] += 1
  # Scenes of 3-4 relations reach 2 and 3 changes often.
  assert counts[2] >= 50 and counts[3] >= 50, counts


def test_perturb_scene_many_with_one_change_draws_as_perturb_scene():
  scene = scenes.sample_scene(np.random.default_rng(5), min_objects=4)
  one = perturb.perturb_scene(scene, np.random.default_rng(9))
  many = perturb.perturb_scene_many(scene, np.random.default_rng(9), 1)
  assert many == (one[0], [one[1]])


def test_perturb_scene_with_every_relation_excluded_says_so():
  scene = scenes.sample_scene(np.random.default_rng(2))
  every = frozenset(range(len(scene.relations)))
  with pytest.raises(ValueError, match="can be reversed alone"):
    perturb.perturb_scene(scene, np.random.default_rng(0), exclude=every)


# Real-world prompts (GenEval / T2I-CompBench / DPG-Bench style) and every output allowed: one
# relation reversed, or the two noun phrases of one relation swapped where they are whole phrases.
FREE_FORM_CASES = {
  "a photo of a dog left of a cat": {
    "a photo of a dog right of a cat",
    "a photo of a cat left of a dog",
  },
  "a photo of a bench below a clock": {
    "a photo of a bench above a clock",
    "a photo of a clock below a bench",
  },
  "A red apple is to the left of a green pear.": {
    "A red apple is to the right of a green pear.",
    "A green pear is to the left of a red apple.",
  },
  "The lamp is above the table.": {"The lamp is below the table.", "The table is above the lamp."},
  "A cat sitting under a wooden chair.": {
    "A cat sitting over a wooden chair.",
    "A wooden chair sitting under a cat.",
  },
  "A bird flying over the ocean at sunset.": {"A bird flying under the ocean at sunset."},
  "On the left of the frame stands a tall lighthouse, and a small boat floats on the right.": {
    "On the right of the frame stands a tall lighthouse, and a small boat floats on the right.",
    "On the left of the frame stands a tall lighthouse, and a small boat floats on the left.",
  },
  "A vase of flowers on top of a piano.": {"A vase of flowers beneath a piano."},
  "The red cube is behind the blue sphere.": {
    "The red cube is in front of the blue sphere.",
    "The blue sphere is behind the red cube.",
  },
  "A man in front of a car.": {"A man behind a car.", "A car in front of a man."},
  "Three books are stacked below a framed painting": {
    "Three books are stacked above a framed painting"
  },
  "In the upper left corner there is a yellow sun.": {
    "In the upper right corner there is a yellow sun."
  },
  "a painting hanging over a fireplace": {
    "a painting hanging under a fireplace",
    "a fireplace hanging over a painting",
  },
  "There is a teddy bear below a shelf.": {
    "There is a teddy bear above a shelf.",
    "There is a shelf below a teddy bear.",
  },
  "A photograph of a sunset over the mountains.": {"A photograph of a sunset under the mountains."},
  "ABOVE THE DOOR HANGS A CLOCK": {"BELOW THE DOOR HANGS A CLOCK"},
  "A lamp to the right of the sofa; a rug beneath the coffee table.": {
    "A lamp to the left of the sofa; a rug beneath the coffee table.",
    "The sofa to the right of a lamp; a rug beneath the coffee table.",
    "A lamp to the right of the sofa; a rug on top of the coffee table.",
    "A lamp to the right of the sofa; the coffee table beneath a rug.",
  },
  "A cat is on the left side of a dog, and a bird is above the dog.": {
    "A cat is on the right side of a dog, and a bird is above the dog.",
    "A dog is on the left side of a cat, and a bird is above the dog.",
    "A cat is on the left side of a dog, and a bird is below the dog.",
    "A cat is on the left side of a dog, and the dog is above a bird.",
  },
  "A boy standing behind a fence, with mountains in the background.": {
    "A boy standing in front of a fence, with mountains in the background.",
    "A fence standing behind a boy, with mountains in the background.",
    "A boy standing behind a fence, with mountains in the foreground.",
  },
  # "the clouds" is plural, "the sun" singular: no swap.
  "The sun is higher than the clouds.": {"The sun is lower than the clouds."},
  # "a plate and a fork ...": the noun phrase is not whole, so only reversals.
  "A knife on the right of a plate and a fork on the left of the plate.": {
    "A knife on the left of a plate and a fork on the left of the plate.",
    "A knife on the right of a plate and a fork on the right of the plate.",
  },
  "a car parked underneath a bridge": {
    "a car parked on top of a bridge",
    "a bridge parked underneath a car",
  },
  "A white horse at the top of a hill.": {
    "A white horse at the bottom of a hill.",
    "A hill at the top of a white horse.",
  },
  "A kite flying above two children on a beach": {"A kite flying below two children on a beach"},
  "Left of the window, a green plant; right of the window, a bookshelf.": {
    "Right of the window, a green plant; right of the window, a bookshelf.",
    "Left of the window, a green plant; left of the window, a bookshelf.",
  },
  "The tree is to the left.": {"The tree is to the right."},
  "A glass of water to the left of a bowl of soup": {
    "A glass of water to the right of a bowl of soup"
  },
  # Swapping around "on top of" would also move the owl's "under a full moon".
  "An owl perched on top of a signpost, under a full moon.": {
    "An owl perched beneath a signpost, under a full moon.",
    "An owl perched on top of a signpost, over a full moon.",
  },
  "A man with a hat stands left of a car.": {"A man with a hat stands right of a car."},
  "A cat and a dog are left of a box.": {"A cat and a dog are right of a box."},
  "A sofa in front of the TV.": {"A sofa behind the TV.", "The TV in front of a sofa."},
  "A horse in back of the barn.": {"A horse in front of the barn.", "The barn in back of a horse."},
  "Two dogs to the right of three cats": {
    "Two dogs to the left of three cats",
    "Three cats to the right of two dogs",
  },
  "A cyclist rides under the bridge while a train passes above it.": {
    "A cyclist rides over the bridge while a train passes above it.",
    "The bridge rides under a cyclist while a train passes above it.",
    "A cyclist rides under the bridge while a train passes below it.",
  },
  "A cat sits on the left side of the image.": {"A cat sits on the right side of the image."},
  "The teapot sits atop a stack of books, and a candle is on its right.": {
    "The teapot sits beneath a stack of books, and a candle is on its right.",
    "The teapot sits atop a stack of books, and a candle is on its left.",
  },
}
NO_RELATION = [
  "a red apple and a cat",
  "A dog next to a bicycle.",
  "A dog sleeps on the rug.",
  "Moreover, a ball near the tree.",
  "All over the floor are toys.",
  "Over 20 people attended the concert.",
  "The man left the room in a hurry.",
]


@pytest.mark.parametrize("prompt", sorted(FREE_FORM_CASES))
def test_perturb_prompt_changes_one_relation(prompt):
  allowed = FREE_FORM_CASES[prompt]
  outputs = {perturb.perturb_prompt(prompt, seed=seed) for seed in range(40)}
  # Every output is an allowed single change, and every allowed change is reachable.
  assert outputs == allowed
  assert perturb.perturb_prompt(prompt, seed=3) == perturb.perturb_prompt(prompt, seed=3)


@pytest.mark.parametrize("prompt", NO_RELATION)
def test_perturb_prompt_none_without_relation(prompt):
  assert perturb.perturb_prompt(prompt, seed=0) is None
  assert perturb.perturb_prompt(prompt, seed=1) is None


def test_perturb_prompt_on_grammar_prompts_changes_one_parsed_relation():
  rng = np.random.default_rng(0)
  for _ in range(200):
    scene = scenes.sample_scene(rng)
    prompt = scenes.scene_to_prompt(scene, rng)
    perturbed = perturb.perturb_prompt(prompt, seed=int(rng.integers(1000)))
    original, changed = scenes.parse_prompt(prompt), scenes.parse_prompt(perturbed)
    # Compare relations by object names: a swap may reorder first mentions.
    names = lambda s: [(s.objects[r.subject], r.relation, s.objects[r.object]) for r in s.relations]  # noqa: E731
    differing = sum(a != b for a, b in zip(names(original), names(changed), strict=True))
    assert differing == 1, (prompt, perturbed)
