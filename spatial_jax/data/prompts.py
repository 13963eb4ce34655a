"""Prompt lists: read from a file (real prompts) or drawn from the synthetic scene grammar.

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
    ValueError: a jsonl line that is not a JSON object with a string `prompt` (line named), or a
      file without prompts.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Prompt file not found: {path}")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
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
) -> list[str]:
  """`count` prompts of the scene grammar, deterministic in `seed`, none of them in `exclude`
  (e.g. held-out evaluation prompts kept out of training)."""
  rng = np.random.default_rng(seed)
  prompts: list[str] = []
  while len(prompts) < count:
    scene = scenes.sample_scene(
      rng, min_objects=min_objects, max_objects=max_objects, max_relations=max_relations
    )
    prompt = scenes.scene_to_prompt(scene, rng)
    if prompt not in exclude:
      prompts.append(prompt)
  return prompts


class PromptSource:
  """Training prompts by step, and the fixed held-out evaluation prompts.

  `train(step)` depends on (seed, step) only, so a resumed run draws what an uninterrupted run
  would; its data state is the step. Evaluation prompts never appear in training.
  """

  def __init__(
    self,
    *,
    seed: int,
    train_file: str = "",
    eval_file: str = "",
    num_eval: int = 16,
    grammar: dict | None = None,
  ):
    self.seed = seed
    self.grammar = dict(grammar or {})
    self.train_pool = read_prompts(train_file) if train_file else None
    if eval_file:
      self.eval_prompts = read_prompts(eval_file)[:num_eval]
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
    self._held_out = frozenset(self.eval_prompts)

  def train(self, step: int, count: int) -> list[str]:
    """The `count` training prompts of `step` (distinct when drawn from a file; the grammar
    may repeat a short prompt)."""
    if self.train_pool is None:
      return synthetic_prompts(count, (self.seed, 0, step), exclude=self._held_out, **self.grammar)
    if count > len(self.train_pool):
      raise ValueError(f"{count} prompts per step but the prompt file has {len(self.train_pool)}")
    rng = np.random.default_rng((self.seed, 0, step))
    return [self.train_pool[i] for i in rng.choice(len(self.train_pool), count, replace=False)]
