"""Prompt lists: read from a file (real prompts) or drawn from the synthetic scene grammar.

The grammar gives prompts two ways: fresh scenes at every draw (`synthetic_prompts`), or a fixed
pool of scenes (`scene_pool_prompts`), each described in several phrasings for training and held
out in its mirrored description (every relation stated from its other object), the synthetic
analogue of RL on a fixed prompt set evaluated on prompts it never saw.

A prompt file is plain text with one prompt per line (blank lines and lines starting with `#`
skipped) or JSON lines with a `prompt` field (`.jsonl`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence

import numpy as np

from spatial_jax.data import scenes


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
  """The prompts of a text or `.jsonl` file (see the module docstring).

  Raises:
    FileNotFoundError: no such file.
    IsADirectoryError: the path is a folder.
    ValueError: a jsonl line that is not a JSON object with a string `prompt` (line named), a
      line that is not UTF-8 (line named), or a file without prompts.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"Prompt file {path} is a folder; give a .txt or .jsonl file in it.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Prompt file not found: {path}")
  prompts = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
          f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8."
        ) from e
      line = line.strip()
      if not line or (line.startswith("#") and not path.endswith(".jsonl")):
        continue
      if path.endswith(".jsonl"):
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
          raise ValueError(f'{path}:{number}: expected an object with a string "prompt" field')
        line = row["prompt"].strip()
      prompts.append(line)
  if not prompts:
    raise ValueError(f"{path} holds no prompts")
  return prompts


def synthetic_prompts(
  count: int,
  seed: int | Sequence[int],
  *,
  min_objects: int = 2,
  max_objects: int = 4,
  max_relations: int = 4,
  exclude: Collection[str] = (),
  min_relations: int = 1,
  distinct: bool = False,
) -> list[str]:
  """`count` prompts of the scene grammar, deterministic in `seed`, none of them in `exclude`
  (e.g. held-out evaluation prompts kept out of training); scenes with fewer than
  `min_relations` relations are skipped, and with `distinct` repeated prompts too."""
  rng = np.random.default_rng(seed)
  prompts: list[str] = []
  while len(prompts) < count:
    scene = scenes.sample_scene(
      rng, min_objects=min_objects, max_objects=max_objects, max_relations=max_relations
    )
    prompt = scenes.scene_to_prompt(scene, rng)
    if len(scene.relations) < min_relations or prompt in exclude:
      continue
    if not (distinct and prompt in prompts):
      prompts.append(prompt)
  return prompts


def long_prompts(count: int, seed: int | Sequence[int]) -> list[str]:
  """`count` distinct grammar prompts of 3-4 objects with at least two relations."""
  return synthetic_prompts(count, seed, min_objects=3, min_relations=2, distinct=True)


def mirrored(scene: scenes.Scene) -> scenes.Scene:
  """The same layout stated the other way round: "a left of b" becomes "b right of a" (objects in
  the order of first mention of the new wording)."""
  relations = tuple(
    scenes.Relation(r.object, scenes.OPPOSITE[r.relation], r.subject) for r in scene.relations
  )
  return scenes.Scene(scene.objects, relations).canonical()


def _phrasings(
  scene: scenes.Scene, count: int, rng: np.random.Generator, exclude: Collection[str] = ()
) -> list[str]:
  found: list[str] = []
  for _ in range(100 * count):
    prompt = scenes.scene_to_prompt(scene, rng)
    if prompt not in found and prompt not in exclude:
      found.append(prompt)
      if len(found) == count:
        return found
  raise ValueError(f"The grammar has fewer than {count} distinct phrasings of {scene}.")


def scene_pool_prompts(
  num_scenes: int,
  phrasings: int,
  seed: int | Sequence[int],
  *,
  min_objects: int = 2,
  max_objects: int = 4,
  max_relations: int = 4,
) -> tuple[list[str], list[str]]:
  """A fixed pool of `num_scenes` scenes: (training prompts, held-out prompts).

  The training prompts are `phrasings` distinct descriptions of each scene; the held-out prompts
  are `phrasings` descriptions of each scene's `mirrored` statement, so they ask for the same
  layouts in other relation words and another word order, and none is a training prompt. The
  scenes have distinct sets of colours (the oracle's identity of an object): a scene's layout is
  then named by its objects, and two scenes never ask for opposite layouts of the same objects.
  Deterministic in `seed`; both lists are grouped by scene.

  Raises:
    ValueError: `num_scenes` or `phrasings` below 1, or a grammar that cannot give `num_scenes`
      scenes with distinct colours or `phrasings` distinct wordings of one.
  """
  if num_scenes < 1 or phrasings < 1:
    raise ValueError(f"Need num_scenes >= 1 and phrasings >= 1, got {num_scenes}, {phrasings}.")
  rng = np.random.default_rng(seed)
  grammar = dict(min_objects=min_objects, max_objects=max_objects, max_relations=max_relations)
  train: list[str] = []
  held_out: list[str] = []
  colour_sets: set[frozenset[str]] = set()
  for _ in range(1000 * num_scenes):
    scene = scenes.sample_scene(rng, **grammar)
    colours = frozenset(o.color for o in scene.objects)
    if colours in colour_sets:
      continue
    colour_sets.add(colours)
    described = _phrasings(scene, phrasings, rng)
    train += described
    held_out += _phrasings(mirrored(scene), phrasings, rng, exclude=described)
    if len(colour_sets) == num_scenes:
      return train, held_out
  raise ValueError(
    f"Found only {len(colour_sets)} scenes with distinct colour sets for a pool of {num_scenes} "
    f"({grammar}); lower the pool size or allow more objects."
  )


class PromptSource:
  """Training prompts by step, and the fixed held-out evaluation prompts.

  `train(step)` depends on (seed, step) only, so a resumed run draws what an uninterrupted run
  would; its data state is the step. Evaluation prompts never appear in training.

  Training prompts come from one of three sources:
  - `train_file`;
  - a pool of `scene_pool` grammar scenes (`scene_pool_prompts`, `pool_phrasings` wordings of
    each). The held-out prompts are then the pool's mirrored wordings (unless `eval_file` is
    given), and `fresh_eval_prompts` are other scenes of the grammar;
  - fresh grammar scenes at each step.
  """

  def __init__(
    self,
    *,
    seed: int,
    train_file: str = "",
    eval_file: str = "",
    num_eval: int = 16,
    grammar: dict | None = None,
    scene_pool: int = 0,
    pool_phrasings: int = 4,
    num_long_eval: int = 0,
  ):
    if train_file and scene_pool:
      raise ValueError(
        f"Training prompts from the file {train_file} and from a pool of {scene_pool} grammar "
        "scenes: give one (config.data.prompts or config.data.scene_pool)."
      )
    self.seed = seed
    self.grammar = dict(grammar or {})
    self.train_pool = read_prompts(train_file) if train_file else None
    pool_held_out = None
    if self.train_pool is None and scene_pool:
      self.train_pool, pool_held_out = scene_pool_prompts(
        scene_pool, pool_phrasings, (seed, 3), **self.grammar
      )
    if eval_file:
      self.eval_prompts = read_prompts(eval_file)[:num_eval]
    elif pool_held_out is not None:
      # Every scene before a second phrasing of any: the scenes' share stays even at any count.
      by_phrasing = [pool_held_out[i::pool_phrasings] for i in range(pool_phrasings)]
      self.eval_prompts = [p for row in by_phrasing for p in row][:num_eval]
    elif self.train_pool is not None:
      # Held out of the file's pool: its last `num_eval` prompts.
      if len(self.train_pool) <= num_eval:
        raise ValueError(
          f"{train_file} has {len(self.train_pool)} prompts: too few to hold out {num_eval} "
          "for evaluation; give config.data.eval_prompts or lower config.eval.num_prompts."
        )
      self.eval_prompts = self.train_pool[-num_eval:]
      self.train_pool = self.train_pool[:-num_eval]
    else:
      self.eval_prompts = synthetic_prompts(num_eval, (seed, 1), **self.grammar)
    # With a pool, the held-out wordings measure the trained scenes; fresh grammar scenes (drawn
    # as a run without a pool draws its held-out ones) measure what carries over to new scenes.
    self.fresh_eval_prompts = (
      synthetic_prompts(num_eval, (seed, 1), exclude=set(self.train_pool), **self.grammar)
      if pool_held_out is not None
      else []
    )
    # Long prompts held out as well (several relations, the full grammar), whatever the training
    # grammar: what training on short scenes carries over to long ones.
    self.long_eval_prompts = long_prompts(num_long_eval, (seed, 4)) if num_long_eval else []
    self._held_out = frozenset(self.eval_prompts) | frozenset(self.long_eval_prompts)

  def train(self, step: int, count: int) -> list[str]:
    """The `count` training prompts of `step` (distinct when drawn from a file; the grammar
    may repeat a short prompt)."""
    if self.train_pool is None:
      return synthetic_prompts(count, (self.seed, 0, step), exclude=self._held_out, **self.grammar)
    if count > len(self.train_pool):
      raise ValueError(f"{count} prompts per step but the prompt file has {len(self.train_pool)}")
    rng = np.random.default_rng((self.seed, 0, step))
    return [self.train_pool[i] for i in rng.choice(len(self.train_pool), count, replace=False)]
