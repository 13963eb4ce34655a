"""Tests for the grain pairs loader: batches, determinism, epochs, resume, sharding, sources."""

import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from spatial_jax.data import loader, pairs, tfds_builder

N_TRAIN = 12
N_TEST = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """12 train + 3 test pairs of random images in two sizes."""
  path = tmp_path_factory.mktemp("pairs")
  rng = np.random.default_rng(0)
  with pairs.PairsWriter(path) as writer:
    for i in range(N_TRAIN + N_TEST):
      shape = (16, 16, 3) if i % 2 else (12, 10, 3)
      writer.add(
        id=f"p{i:02d}",
        prompt=f"prompt {i}",
        perturbed_prompt=f"perturbed {i}",
        relation_changed="left of -> right of",
        chosen_image=rng.integers(0, 256, shape, dtype=np.uint8),
        rejected_image=rng.integers(0, 256, shape, dtype=np.uint8),
        split="test" if i >= N_TRAIN else None,
      )
  return path


@pytest.fixture(scope="module")
def builder(folder, tmp_path_factory):
  return tfds_builder.build_tfds(folder, tmp_path_factory.mktemp("tfds"))


def _loader(source, **kwargs):
  kwargs = {"batch_size": 4, "image_size": 8, "shard_index": 0, "shard_count": 1, **kwargs}
  return loader.make_pairs_loader(source, **kwargs)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _ids(batches):
  return [i for b in batches for i in b["id"]]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout_and_resize(folder):
  batch = next(_loader(folder, image_size=(8, 6)))
  assert batch["chosen"].shape == batch["rejected"].shape == (4, 8, 6, 3)
  assert batch["chosen"].dtype == np.uint8
  for k in ("id", "prompt", "perturbed_prompt", "relation_changed", "index"):
    assert batch[k].shape == (4,), k
  assert isinstance(batch["prompt"][0], str) and batch["index"].dtype == np.int64
  records = pairs.read_pairs(folder, split="train")
  for j in range(4):
    r = records[batch["index"][j]]
    assert (batch["id"][j], batch["prompt"][j]) == (r.id, r.prompt)
    original = pairs.load_rgb(folder / r.chosen)
    np.testing.assert_array_equal(batch["chosen"][j], pairs.resize_rgb(original, (8, 6)))


def test_same_seed_same_batches_other_seed_other_order(folder):
  a = _take(_loader(folder, seed=3), 6)
  _assert_same_batches(a, _take(_loader(folder, seed=3), 6))
  assert _ids(_take(_loader(folder, seed=4), 6)) != _ids(a)


def test_each_epoch_is_a_new_permutation(folder):
  batches = list(_loader(folder, num_epochs=3))
  assert len(batches) == 3 * N_TRAIN // 4  # Finite: the iterator ends.
  ids = _ids(batches)
  epochs = [ids[e * N_TRAIN : (e + 1) * N_TRAIN] for e in range(3)]
  everything = sorted(f"p{i:02d}" for i in range(N_TRAIN))
  assert all(sorted(epoch) == everything for epoch in epochs)
  assert epochs[0] != epochs[1] != epochs[2]  # Reshuffled every epoch.


def test_drop_remainder_false_keeps_the_last_partial_batch(folder):
  batches = list(_loader(folder, batch_size=5, num_epochs=2, drop_remainder=False))
  assert [len(b["id"]) for b in batches] == [5, 5, 5, 5, 4]
  ids = _ids(batches)
  assert sorted(ids[:N_TRAIN]) == sorted(ids[N_TRAIN:]) == sorted(set(ids))


def test_unshuffled_order_is_file_order(folder):
  batches = _take(_loader(folder, shuffle=False), 4)
  assert _ids(batches) == [f"p{i % N_TRAIN:02d}" for i in range(16)]


def test_resume_mid_epoch(folder):
  it = _loader(folder, seed=1)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # What grain's checkpoint handler stores.
  expected = _take(it, 5)  # Runs into the next epochs.
  resumed = _loader(folder, seed=1)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 5), expected)


def test_resume_through_orbax_checkpoint(folder, tmp_path):
  it = _loader(folder, seed=2)
  _take(it, 1)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
  manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = _take(it, 3)
  resumed = _loader(folder, seed=2)
  manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same_batches(_take(resumed, 3), expected)


def test_shards_are_disjoint_and_cover_each_epoch(folder):
  shards = [
    _ids(list(_loader(folder, batch_size=2, num_epochs=2, shard_index=i, shard_count=3)))
    for i in range(3)
  ]
  per_shard = N_TRAIN // 3
  for epoch in range(2):
    parts = [set(ids[epoch * per_shard : (epoch + 1) * per_shard]) for ids in shards]
    assert sum(len(p) for p in parts) == N_TRAIN
    assert set.union(*parts) == {f"p{i:02d}" for i in range(N_TRAIN)}
  # A shard sees different pairs in different epochs (the global permutation is re-split).
  assert set(shards[0][:per_shard]) != set(shards[0][per_shard:])


def test_shards_concatenated_are_the_global_batches(folder):
  # 3 processes with 2 pairs each read what one process reads with 6, row for row, across the
  # epoch boundary too (a run gives the same batches on any number of processes).
  one = list(_loader(folder, batch_size=6, num_epochs=3))
  shards = [
    list(_loader(folder, batch_size=2, num_epochs=3, shard_index=i, shard_count=3))
    for i in range(3)
  ]
  assert all(len(s) == len(one) == 6 for s in shards)
  for b, batch in enumerate(one):
    for key in ("id", "index", "chosen"):
      joined = np.concatenate([s[b][key] for s in shards])
      np.testing.assert_array_equal(joined, batch[key], err_msg=f"batch {b} {key}")


def test_uneven_shards_give_equal_batch_counts(folder):
  # 12 pairs, 5 shards of 2: one global batch of 10, the last 2 dropped, so every process steps
  # in lockstep.
  shards = [
    _ids(list(_loader(folder, batch_size=2, num_epochs=1, shard_index=i, shard_count=5)))
    for i in range(5)
  ]
  assert [len(s) for s in shards] == [2] * 5
  assert len(set().union(*shards)) == 10
  keep_all = {"batch_size": 1, "num_epochs": 1, "shard_count": 5, "drop_remainder": False}
  kept = [_ids(list(_loader(folder, shard_index=i, **keep_all))) for i in range(5)]
  assert sorted(i for s in kept for i in s) == [f"p{i:02d}" for i in range(N_TRAIN)]


def test_default_shard_is_this_process(folder):
  batches = list(loader.make_pairs_loader(folder, batch_size=4, image_size=8, num_epochs=1))
  assert len(_ids(batches)) == N_TRAIN  # One process: the whole split.


def test_tfds_source_gives_the_same_batches(folder, builder):
  for split in ("train", "test"):
    kwargs = {"split": split, "batch_size": 3, "seed": 5, "num_epochs": 2}
    _assert_same_batches(list(_loader(folder, **kwargs)), list(_loader(builder, **kwargs)))


def test_mp_prefetch_matches_in_process(builder):
  # The worker process unpickles the whole pipeline, tfds source and builder included.
  options = grain.MultiprocessingOptions(num_workers=1)
  it = _loader(builder, num_epochs=1, mp_prefetch=options)
  try:
    _assert_same_batches(list(it), list(_loader(builder, num_epochs=1)))
  finally:
    it.close()


def test_errors_name_the_problem(folder):
  with pytest.raises(ValueError, match=r"split 'val' has no rows; splits: \['test', 'train'\]"):
    _loader(folder, split="val")
  with pytest.raises(ValueError, match="too few for one batch of 8"):
    _loader(folder, split="test", batch_size=8, num_epochs=2)
  with pytest.raises(ValueError, match="shard_index < shard_count"):
    _loader(folder, shard_index=2, shard_count=2)
  with pytest.raises(TypeError, match="pairs folder path, a prepared tfds builder"):
    _loader(42)
