"""Tests for the TFDS (array_record) build of a pairs folder."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from spatial_jax.data import pairs, tfds_builder


def _make_folder(folder, *, n_train=4, n_test=2, seed=0):
  """Pairs with varied image sizes; test rows are interleaved with train rows. Returns new images."""
  rng = np.random.default_rng(seed)
  images = {}
  with pairs.PairsWriter(folder) as writer:
    for i in range(n_train + n_test):
      if writer.has(f"p{i}"):  # A rerun only adds the new rows.
        continue
      h, w = (16, 12) if i % 2 else (10, 14)
      chosen = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      rejected = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      writer.add(
        id=f"p{i}",
        prompt=f"prompt {i}",
        perturbed_prompt=f"perturbed {i}",
        relation_changed="above -> below",
        chosen_image=chosen,
        rejected_image=rejected,
        split="test" if i % 3 == 1 and i // 3 < n_test else None,
        source={"seed": i} if i % 2 else None,
      )
      images[f"p{i}"] = (chosen, rejected)
  return images


def _text(x):
  return x.decode() if isinstance(x, bytes) else x


def test_module_imports_do_not_import_tensorflow():
  code = (
    "import sys; import spatial_jax.data.pairs, spatial_jax.data.tfds_builder, spatial_jax.data.loader;"
    "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules];"
    "assert not bad, bad"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_tensorflow_datasets_names_the_extra():
  code = """
import sys
sys.modules["tensorflow_datasets"] = None  # As if the tfds extra were not installed.
from spatial_jax.data import tfds_builder
for use in (lambda: tfds_builder.build_tfds("pairs", "tfds"), lambda: tfds_builder.PairsDatasetBuilder):
  try:
    use()
  except ImportError as e:
    assert "pip install -e '.[tfds]'" in str(e), e
  else:
    raise AssertionError("no ImportError")
"""
  subprocess.run([sys.executable, "-c", code], check=True)


def test_build_and_read_back(tmp_path):
  images = _make_folder(tmp_path / "pairs")
  builder = tfds_builder.build_tfds(tmp_path / "pairs", tmp_path / "tfds")
  assert str(builder.data_dir).startswith(str(tmp_path / "tfds"))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 4, "test": 2}
  # Training hosts can read the build without the pairs folder or this module's builder class.
  read_only = tfds.builder_from_directory(builder.data_dir)
  for split in ("train", "test"):
    records = pairs.read_pairs(tmp_path / "pairs", split=split)
    source = read_only.as_data_source(split)
    assert len(source) == len(records)
    for i, r in enumerate(records):  # Same order as pairs.jsonl.
      ex = source[i]
      assert _text(ex["id"]) == r.id
      assert _text(ex["prompt"]) == r.prompt
      assert _text(ex["perturbed_prompt"]) == r.perturbed_prompt
      assert _text(ex["relation_changed"]) == r.relation_changed
      assert json.loads(_text(ex["source_json"])) == r.source
      np.testing.assert_array_equal(ex["chosen"], images[r.id][0])
      np.testing.assert_array_equal(ex["rejected"], images[r.id][1])


def test_build_resizes_and_rebuilds_only_on_change(tmp_path):
  images = _make_folder(tmp_path / "pairs", n_test=0)
  builder = tfds_builder.build_tfds(tmp_path / "pairs", tmp_path / "tfds", image_size=(8, 6))
  source = builder.as_data_source("train")
  assert list(builder.info.splits) == ["train"]
  for i in range(len(source)):
    ex = source[i]
    expected = pairs.resize_rgb(images[_text(ex["id"])][0], (8, 6))
    np.testing.assert_array_equal(ex["chosen"], expected)
    assert ex["rejected"].shape == (8, 6, 3)
  # Same folder and size: the build is reused.
  again = tfds_builder.build_tfds(tmp_path / "pairs", tmp_path / "tfds", image_size=(8, 6))
  assert again.data_dir == builder.data_dir
  # The folder grew (e.g. a rerun of the data job): a new build, not the stale one.
  _make_folder(tmp_path / "pairs", n_train=6, n_test=0)
  grown = tfds_builder.build_tfds(tmp_path / "pairs", tmp_path / "tfds", image_size=(8, 6))
  assert grown.data_dir != builder.data_dir
  assert len(grown.as_data_source("train")) == 6


def test_source_pickles_for_worker_processes(tmp_path):
  _make_folder(tmp_path / "pairs", n_train=2, n_test=0)
  source = tfds_builder.build_tfds(tmp_path / "pairs", tmp_path / "tfds").as_data_source("train")
  restored = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(restored[1]["chosen"], source[1]["chosen"])


def test_bad_split_name(tmp_path):
  _make_folder(tmp_path / "pairs", n_train=1, n_test=0)
  rng = np.random.default_rng(0)
  with pairs.PairsWriter(tmp_path / "pairs") as writer:
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    writer.add(
      id="x",
      prompt="p",
      perturbed_prompt="q",
      relation_changed="r",
      chosen_image=image,
      rejected_image=image,
      split="val-1",
    )
  with pytest.raises(pairs.PairsFormatError, match=r"split names must be .* \['val-1'\]"):
    tfds_builder.build_tfds(tmp_path / "pairs", tmp_path / "tfds")


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="pairs folder not found"):
    tfds_builder.build_tfds(tmp_path / "nowhere", tmp_path / "tfds")
