"""Job `data_synthetic`: adversarial preference pairs from the synthetic world.

Each pair: a scene with 2-4 objects and 1-4 relations is described by a prompt;
the chosen image is rendered from the scene, the rejected image from the same
scene with exactly one relation changed. Both are judged against the original
prompt, so the pair differs only in space (the paper's construction, with the
renderer standing in for the text-to-image models).

Pair `i` of a split is a pure function of (seed, split, i): a rerun into the
same folder skips the ids already written and produces the rest identically, so
an interrupted build resumes without duplicates or gaps.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from spatial_jax import metrics
from spatial_jax.data import oracle, pairs, perturb, render, scenes

_SPLITS = ("train", "test")
REJECTED_KINDS = ("perturbed", "other_scene")


def pair_id(split: str, index: int) -> str:
  return f"{split}-{index:06d}"


def _split_counts(config: Any) -> list[tuple[str, int]]:
  return [("train", config.num_train), ("test", config.num_test)]


def make_pair(config: Any, split: str, index: int) -> dict[str, Any]:
  """Builds pair `index` of `split` deterministically from `config.seed`."""
  rng = np.random.default_rng([config.seed, _SPLITS.index(split), index])
  scene = scenes.sample_scene(
    rng,
    min_objects=config.min_objects,
    max_objects=config.max_objects,
    max_relations=config.max_relations,
  )
  # Both prompts are worded with the same template draws, so (up to the
  # subject/object order of a swap) only the changed relation reads differently.
  template_seed = int(rng.integers(0, 2**31 - 1))
  prompt = scenes.scene_to_prompt(scene, np.random.default_rng(template_seed))
  if config.get("rejected", "perturbed") == "other_scene":
    return _other_scene_pair(config, split, index, scene, rng, prompt)
  # `max_changes` > 1: the rejected scene reverses 1..max_changes relations (the paper's pairs
  # with 2-3 perturbations; as many as the scene allows). The count is drawn only then, so the
  # one-change folders stay as they were.
  max_changes = config.get("max_changes", 1)
  count = int(rng.integers(1, max_changes + 1)) if max_changes > 1 else 1
  perturbed, changes = perturb.perturb_scene_many(scene, rng, count)
  perturbed_prompt = scenes.scene_to_prompt(perturbed, np.random.default_rng(template_seed))
  chosen_seed, rejected_seed = (int(s) for s in rng.integers(0, 2**31 - 1, size=2))
  # Drawn after everything else, so that a folder without recoloured pairs stays as it was.
  recolour = config.get("recolour_fraction", 0.0)
  if recolour > 0 and rng.random() < recolour:
    return _recoloured_pair(config, split, index, scene, rng, template_seed, chosen_seed, prompt)
  k = config.get("layout_candidates", 1)
  chosen = render.render_scene(scene, size=config.image_size, seed=chosen_seed, layout_candidates=k)
  rejected = render.render_scene(
    perturbed, size=config.image_size, seed=rejected_seed, layout_candidates=k
  )
  name = lambda i: scene.objects[i].name  # noqa: E731
  first = changes[0]
  source = _source(
    config,
    scene,
    chosen_seed,
    rejected_seed,
    f"{first.before.relation} -> {first.after.relation}",
    first.kind,
    first.type,
  )
  return dict(
    id=pair_id(split, index),
    prompt=prompt,
    perturbed_prompt=perturbed_prompt,
    # A swap keeps the relation word and exchanges the objects, so the field
    # names both: "red circle left of blue star -> blue star left of red circle"
    # (several changes: joined by "; ").
    relation_changed="; ".join(
      f"{name(c.before.subject)} {c.before.relation} {name(c.before.object)} -> "
      f"{name(c.after.subject)} {c.after.relation} {name(c.after.object)}"
      for c in changes
    ),
    chosen_image=chosen,
    rejected_image=rejected,
    split=split,
    source={**source, "num_changes": len(changes)},
  )


def _source(config, scene, chosen_seed, rejected_seed, change, kind, change_type) -> dict:
  """A pair's provenance: its seeds, what changed, and the scene's size."""
  return dict(
    generator="synthetic",
    seed=config.seed,
    chosen_seed=chosen_seed,
    rejected_seed=rejected_seed,
    change=change,
    change_kind=kind,
    change_type=change_type,
    num_objects=len(scene.objects),
    num_relations=len(scene.relations),
  )


def _recoloured_pair(config, split, index, scene, rng, template_seed, chosen_seed, prompt):
  """A pair whose rejected image shows one object in a colour the prompt does not name.

  The relation pairs never show an image that lacks a named object, so a reward trained on them
  alone cannot tell a missing object from a present one, and GRPO on it learns to lose objects
  (docs/results/grpo_synthetic.md). The rejected scene keeps every shape and relation, and its
  prompt (the perturbed one) is worded with the same template draws: it differs in one colour
  word, so the perturbed-prompt and text-contrast terms of the reward's loss stay right.
  """
  recoloured, obj, old_colour = perturb.recolour_scene(scene, rng)
  perturbed_prompt = scenes.scene_to_prompt(recoloured, np.random.default_rng(template_seed))
  k = config.get("layout_candidates", 1)
  size = config.image_size
  # One layout seed for both: the images differ only in that object's colour.
  chosen = render.render_scene(scene, size=size, seed=chosen_seed, layout_candidates=k)
  rejected = render.render_scene(recoloured, size=size, seed=chosen_seed, layout_candidates=k)
  shape, new_colour = scene.objects[obj].shape, recoloured.objects[obj].color
  return dict(
    id=pair_id(split, index),
    prompt=prompt,
    perturbed_prompt=perturbed_prompt,
    relation_changed=f"{old_colour} {shape} -> {new_colour} {shape}",
    chosen_image=chosen,
    rejected_image=rejected,
    split=split,
    source=_source(
      config, scene, chosen_seed, chosen_seed, f"{old_colour} -> {new_colour}", "recolour", "colour"
    ),
  )


def _other_scene_pair(config, split, index, scene, rng, prompt):
  """A pair whose rejected image shows another scene (`rejected="other_scene"`).

  The negatives of a generic image-text matching model (as CLIP's are other captions' images):
  they differ from the prompt in objects and colours far more often than in space, so a reward
  trained on them is the zero-shot judge a newcomer would reach for, not a spatial one.
  """
  other = scenes.sample_scene(
    rng,
    min_objects=config.min_objects,
    max_objects=config.max_objects,
    max_relations=config.max_relations,
  )
  other_prompt = scenes.scene_to_prompt(other, rng)
  chosen_seed, rejected_seed = (int(s) for s in rng.integers(0, 2**31 - 1, size=2))
  k = config.get("layout_candidates", 1)
  chosen = render.render_scene(scene, size=config.image_size, seed=chosen_seed, layout_candidates=k)
  rejected = render.render_scene(
    other, size=config.image_size, seed=rejected_seed, layout_candidates=k
  )
  return dict(
    id=pair_id(split, index),
    prompt=prompt,
    perturbed_prompt=other_prompt,
    relation_changed="another scene",
    chosen_image=chosen,
    rejected_image=rejected,
    split=split,
    source=_source(
      config, scene, chosen_seed, rejected_seed, "another scene", "other_scene", "other_scene"
    ),
  )


def _write_pairs(config: Any, workdir: str) -> int:
  """Writes every missing pair; returns how many were written by this run."""
  total = config.num_train + config.num_test
  progress = metrics.Progress(total, every_secs=config.log_every_secs, name="pairs")
  written = 0
  # Synthetic pairs are cheap to make again: durable 512 at a time, not one by one (the fsyncs
  # were half of a pair's cost).
  with pairs.PairsWriter(workdir, sync_every=512) as writer:
    every = [(split, index) for split, count in _split_counts(config) for index in range(count)]
    todo = [(split, index) for split, index in every if not writer.has(pair_id(split, index))]
    done = len(every) - len(todo)
    for pair in _made_in_order(config, todo):
      writer.add(**pair)
      written += 1
      done += 1
      progress.update(done)
  return written


# Below this many pairs, one process (a worker pool takes ~2 s to start).
_PARALLEL_MIN_PAIRS = 2048
_BLOCK = 1024  # Pairs in flight per block: memory stays bounded for large images.


def _make_pair_args(args: tuple[Any, str, int]) -> dict[str, Any]:
  return make_pair(*args)


def _made_in_order(config: Any, todo: list[tuple[str, int]]) -> Iterator[dict[str, Any]]:
  """`make_pair` of each (split, index), in order; on the machine's cores when there are many.

  Each pair is a pure function of (seed, split, index), so the workers' pairs are the ones a
  single process makes; this process writes them (PNG encoding, fsyncs) while the workers
  render the next block.
  """
  workers = min(os.cpu_count() or 1, 8)
  if workers < 2 or len(todo) < _PARALLEL_MIN_PAIRS:
    for split, index in todo:
      yield make_pair(config, split, index)
    return
  # Spawned, not forked: this process may already run JAX's threads.
  context = multiprocessing.get_context("spawn")
  args = [(config, split, index) for split, index in todo]
  blocks = [args[i : i + _BLOCK] for i in range(0, len(args), _BLOCK)]
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    pending = pool.map(_make_pair_args, blocks[0], chunksize=32)
    for k in range(len(blocks)):
      following = (
        pool.map(_make_pair_args, blocks[k + 1], chunksize=32) if k + 1 < len(blocks) else None
      )
      yield from pending
      pending = following


def _statistics(config: Any, workdir: str, records: list[pairs.PairRecord]) -> dict[str, Any]:
  """Counts per split / relation / size, and the oracle's verdict on every pair."""
  stats: dict[str, Any] = {"num_pairs": len(records), "image_size": config.image_size}
  by_split = collections.Counter(r.split or "train" for r in records)
  stats["splits"] = dict(sorted(by_split.items()))
  keys = ("change", "change_type", "change_kind", "num_objects", "num_relations", "num_changes")
  for key in keys:
    counts = collections.Counter(
      str(r.source[key]) for r in records if isinstance(r.source, dict) and key in r.source
    )
    stats[key] = dict(sorted(counts.items()))
  words = [len(r.prompt.split()) for r in records]
  stats["prompt_words"] = {"mean": float(np.mean(words)), "max": int(np.max(words))}
  if config.verify_with_oracle:
    chosen_ok = rejected_caught = 0
    for r in records:
      chosen = pairs.load_rgb(os.path.join(workdir, r.chosen))
      rejected = pairs.load_rgb(os.path.join(workdir, r.rejected))
      chosen_ok += oracle.score_prompt(chosen, r.prompt).fraction == 1.0
      rejected_caught += oracle.score_prompt(rejected, r.prompt).fraction < 1.0
    stats["oracle"] = {
      "chosen_all_satisfied": chosen_ok / len(records),
      "rejected_violates_prompt": rejected_caught / len(records),
    }
  return stats


def _gallery(
  workdir: str, records: list[pairs.PairRecord], num_pairs: int
) -> tuple[np.ndarray, int]:
  """Images and column count of a grid: chosen images on even rows, their rejected ones below."""
  shown = records[:num_pairs]
  ncols = min(8, len(shown))
  rows = []
  for start in range(0, len(shown), ncols):
    group = shown[start : start + ncols]
    rows.append([pairs.load_rgb(os.path.join(workdir, r.chosen)) for r in group])
    rows.append([pairs.load_rgb(os.path.join(workdir, r.rejected)) for r in group])
  images = [image for row in rows for image in row + [np.zeros_like(row[0])] * (ncols - len(row))]
  return np.stack(images), ncols


# Fields that decide what pair i looks like. A rerun into the same folder must use the same
# values, or the folder would mix pairs of two worlds while skipping the ids it already has.
GENERATOR_FIELDS = (
  "seed",
  "image_size",
  "min_objects",
  "max_objects",
  "max_relations",
  "layout_candidates",
  "recolour_fraction",
  "max_changes",
  "rejected",
)
# What a folder recorded before a field existed meant.
_FIELD_DEFAULTS = {
  "layout_candidates": 1,
  "recolour_fraction": 0.0,
  "max_changes": 1,
  "rejected": "perturbed",
}
_GENERATOR_FILE = "generator.json"


def _check_generator_fields(config: Any, workdir: str) -> None:
  fields = {name: config.get(name, _FIELD_DEFAULTS.get(name)) for name in GENERATOR_FIELDS}
  path = os.path.join(workdir, _GENERATOR_FILE)
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    recorded = {k: recorded.get(k, _FIELD_DEFAULTS.get(k)) for k in GENERATOR_FIELDS}
    differ = {k: (recorded[k], v) for k, v in fields.items() if recorded[k] != v}
    if differ:
      raise ValueError(
        f"{workdir} holds pairs made with other settings (recorded -> now: {differ}); "
        "use a new folder or the recorded values."
      )
  elif pairs.PAIRS_FILE in os.listdir(workdir):
    logging.warning("%s has pairs but no %s; assuming they match.", workdir, _GENERATOR_FILE)
  metrics.write_summary(workdir, fields, name=_GENERATOR_FILE)


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Writes the pairs folder, `gallery.png` and `stats.json` into `workdir`."""
  import jax

  if jax.process_index() != 0:
    logging.info("data_synthetic writes from process 0 only; nothing to do here.")
    return {}
  if config.num_train < 0 or config.num_test < 0 or config.num_train + config.num_test == 0:
    raise ValueError(
      f"num_train/num_test must be >= 0 and not both 0, got {config.num_train}/{config.num_test}."
    )
  if config.get("rejected", "perturbed") not in REJECTED_KINDS:
    raise ValueError(f"config.rejected={config.rejected!r}: one of {REJECTED_KINDS}")
  if config.get("max_changes", 1) < 1:
    raise ValueError(f"config.max_changes must be >= 1, got {config.max_changes}")
  os.makedirs(workdir, exist_ok=True)
  _check_generator_fields(config, workdir)
  start = time.time()
  written = _write_pairs(config, workdir)
  records = pairs.read_pairs(workdir)
  expected = {pair_id(s, i) for s, n in _split_counts(config) for i in range(n)}
  extra = sorted({r.id for r in records} - expected)
  if extra:
    logging.warning(
      "%s holds %d pairs not in this config (e.g. %s); a larger earlier build?",
      workdir,
      len(extra),
      extra[:3],
    )
  stats = _statistics(config, workdir, records)
  stats["written_by_this_run"] = written
  stats["seconds"] = round(time.time() - start, 2)
  if records and config.gallery_pairs > 0:
    images, ncols = _gallery(workdir, records, config.gallery_pairs)
    metrics.write_images(
      None, 0, "gallery", images, png_path=os.path.join(workdir, "gallery.png"), ncols=ncols
    )
  metrics.write_summary(workdir, stats, name="stats.json")
  logging.info(
    "Wrote %d new pairs (%d in %s) in %.1f s", written, len(records), workdir, stats["seconds"]
  )
  return stats


def ensure_pairs(config: Any, workdir: str) -> str:
  """A training job's pairs: `config.data.pairs`, or (when empty) synthetic pairs of
  `config.data.synthetic` built once into `<workdir>/pairs` (by process 0; every process then
  checks that it sees them, so the workdir must be shared)."""
  if config.data.pairs:
    return config.data.pairs
  import jax
  import ml_collections

  folder = os.path.join(workdir, "pairs")
  data_config = ml_collections.ConfigDict(dict(config.data.synthetic))
  data_config.seed = config.seed
  run(data_config, folder)  # Writes from process 0 only.
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("spatial_jax.jobs.data_synthetic:ensure_pairs")
    if not os.path.exists(os.path.join(folder, pairs.PAIRS_FILE)):
      raise FileNotFoundError(
        f"Process {jax.process_index()} cannot see the synthetic pairs process 0 wrote to "
        f"{folder}: the workdir must be a folder every process shares (or set config.data.pairs "
        "to a pairs folder each process can read)."
      )
  return folder
