"""Grain input pipeline over preference pairs (a pairs folder or its TFDS array_record build).

    source -> MapDataset.source -> (+ index) -> seed/shuffle -> repeat
           -> decode + resize (PIL) -> batch -> shard -> to_iter_dataset [-> mp_prefetch]

Shuffling is global and reseeded each epoch (grain's shuffle folds the epoch into its seed).
With several shards (processes), shard i takes the i-th block of every global batch (batch_size
x shard_count pairs, in the shuffled order), so together the processes read exactly the batches
one process would read with the global batch size, in the same row order.
All processes must therefore use the same seed. Batches are dicts of numpy arrays:

  chosen, rejected                   (B, H, W, 3) uint8
  id, prompt, perturbed_prompt,
  relation_changed                   (B,) object arrays of str
  index                              (B,) int64, the pair's row index within the split

The iterator's `get_state()`/`set_state()` is plain JSON, so `grain.checkpoint.CheckpointSave(it)`
saves it next to the model state; rebuild the loader with the same arguments before restoring.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from spatial_jax.data import pairs as pairs_lib

TEXT_KEYS = ("id", "prompt", "perturbed_prompt", "relation_changed")
IMAGE_KEYS = ("chosen", "rejected")

# grain's default (16 threads, 500 prefetched elements) is sized for ~KiB records; here an element
# is a whole batch of images, so a small buffer keeps host memory bounded.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


class PairsSource:
  """Random-access (grain) source over one split of a pairs folder; decodes images to RGB uint8.

  Element: {id, prompt, perturbed_prompt, relation_changed: str; chosen, rejected: (H, W, 3)
  uint8 at their stored size}. Rows are in `pairs.jsonl` order, like the TFDS build's split.
  """

  def __init__(self, folder: str | os.PathLike, *, split: str = "train", check_images=True):
    self.folder = os.fspath(folder)
    self.split = split
    self.records = pairs_lib.read_pairs(folder, split=split, check_images=check_images)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    r = self.records[index]
    example = {k: getattr(r, k) for k in TEXT_KEYS}
    for k in IMAGE_KEYS:
      example[k] = pairs_lib.load_rgb(os.path.join(self.folder, getattr(r, k)))
    return example

  def __repr__(self) -> str:
    return f"PairsSource({self.folder!r}, split={self.split!r}, len={len(self)})"


def _as_str(x: Any) -> str:
  # TFDS text features come back as bytes; PairsSource gives str.
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


@dataclasses.dataclass(frozen=True)
class _AddIndex:
  """Adds the row index in the split (grain passes epoch * num_rows + row past the first epoch)."""

  num_rows: int

  def __call__(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
    return {**example, "index": index % self.num_rows}


@dataclasses.dataclass(frozen=True)
class _DecodeResize:
  """Text to str, images to (H, W, 3) uint8 at `size_hw` (a picklable callable for mp_prefetch)."""

  size_hw: tuple[int, int]

  def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
    out = {k: _as_str(example[k]) for k in TEXT_KEYS}
    for k in IMAGE_KEYS:
      out[k] = pairs_lib.resize_rgb(pairs_lib.load_rgb(example[k]), self.size_hw)
    out["index"] = example["index"]
    return out


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  batch = {k: np.stack([e[k] for e in examples]) for k in IMAGE_KEYS}
  for k in TEXT_KEYS:
    # Object arrays of Python str: no fixed-width '<U' padding, and tokenizers take them as is.
    batch[k] = np.array([e[k] for e in examples], dtype=object)
  batch["index"] = np.array([e["index"] for e in examples], dtype=np.int64)
  return batch


def _make_source(pairs_dir_or_builder: Any, split: str):
  if isinstance(pairs_dir_or_builder, str | os.PathLike):
    source = PairsSource(pairs_dir_or_builder, split=split)
    if not len(source):
      splits = {r.split_name for r in pairs_lib.read_pairs(source.folder, check_images=False)}
      raise ValueError(f"{source.folder}: split {split!r} has no rows; splits: {sorted(splits)}")
    return source
  if hasattr(pairs_dir_or_builder, "as_data_source"):  # A (prepared) tfds builder.
    return pairs_dir_or_builder.as_data_source(split)
  if hasattr(pairs_dir_or_builder, "__getitem__") and hasattr(pairs_dir_or_builder, "__len__"):
    return pairs_dir_or_builder  # Already a random-access source (e.g. a PairsSource).
  raise TypeError(
    "make_pairs_loader takes a pairs folder path, a prepared tfds builder or a random-access "
    f"source, got {type(pairs_dir_or_builder).__name__}"
  )


def make_pairs_loader(
  pairs_dir_or_builder: str | os.PathLike | Any,
  *,
  split: str = "train",
  batch_size: int,
  image_size: int | tuple[int, int],
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  drop_remainder: bool = True,
  read_options: grain.ReadOptions | None = None,
  mp_prefetch: grain.MultiprocessingOptions | None = None,
) -> grain.DatasetIterator:
  """Returns a checkpointable iterator of per-process batches of preference pairs.

  Args:
    pairs_dir_or_builder: a pairs folder (read through `PairsSource`), a prepared tfds builder
      (e.g. from `tfds_builder.build_tfds`, read through `as_data_source(split)`), or any
      random-access source with the same element keys.
    split: split to read (rows without a `split` are "train").
    batch_size: per-process batch size.
    image_size: int side or (height, width) of the output images (PIL bicubic resize).
    seed: shuffle seed; must be the same on every process.
    shuffle: shuffle globally, with a new permutation each epoch.
    num_epochs: number of passes over the split; None repeats forever. Batches run across epoch
      boundaries.
    shard_index: this process's shard; defaults to `jax.process_index()`.
    shard_count: number of shards; defaults to `jax.process_count()`.
    drop_remainder: drop the last partial batch, and with several shards the last incomplete
      global batch, so that every process yields the same number of full batches (no process
      waits forever in a collective). False keeps everything.
    read_options: grain thread prefetch settings (default `DEFAULT_READ_OPTIONS`).
    mp_prefetch: process-based prefetch (e.g. `grain.MultiprocessingOptions(num_workers=4)`);
      None (default) stays in this process.

  Returns:
    A `grain.DatasetIterator` of batch dicts (see the module docstring).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  size_hw = pairs_lib.image_size_hw(image_size)

  source = _make_source(pairs_dir_or_builder, split)
  ds = grain.MapDataset.source(source).map_with_index(_AddIndex(len(source)))
  if shuffle:
    ds = ds.seed(seed).shuffle()
  global_batch = batch_size * shard_count
  per_epoch = len(ds)
  too_few = drop_remainder and num_epochs is not None and per_epoch * num_epochs < global_batch
  if per_epoch == 0 or too_few:
    raise ValueError(
      f"split {split!r} ({len(source)} pairs) is too few for one batch of {batch_size}"
      + (f" per shard x {shard_count} shards" if shard_count > 1 else "")
    )
  ds = ds.repeat(num_epochs)
  ds = ds.map(_DecodeResize(size_hw))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_collate)
  if shard_count > 1:
    # Shard i reads the i-th block of batch_size pairs of every global batch, so the shards'
    # batches, concatenated in shard order, are the batches of one reader with the global batch
    # size: a run gives the same batches on any number of processes. Every shard gets the same
    # number of batches (a last incomplete global batch is dropped) so none waits in a
    # collective for another's batch.
    if drop_remainder:
      ds = ds[: len(ds) // shard_count * shard_count]
    ds = ds[shard_index::shard_count]
  iter_ds = ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
  if mp_prefetch is not None:
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18's mp_prefetch reads an absl flag directly and raises UnparsedFlagAccessError
      # outside absl.app.run (pytest, Colab). Defaults are what we want; app.run still parses argv.
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(mp_prefetch)
  return iter(iter_ds)
