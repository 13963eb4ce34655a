"""Tests for the pairs format: reading, validation errors and the crash-safe writer."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from spatial_jax import fileio
from spatial_jax.data import pairs


def _image(rng, h=8, w=8):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(folder, n, *, seed=0, start=0, sync_every=1, skip_existing=False, **fields):
  rng = np.random.default_rng(seed)
  images = {}
  with pairs.PairsWriter(folder, sync_every=sync_every) as writer:
    for i in range(start, start + n):
      chosen, rejected = _image(rng), _image(rng)
      if skip_existing and writer.has(f"p{i}"):
        continue
      writer.add(
        id=f"p{i}",
        prompt=f"a red cube left of a blue ball {i}",
        perturbed_prompt=f"a red cube right of a blue ball {i}",
        relation_changed="left of -> right of",
        chosen_image=chosen,
        rejected_image=rejected,
        **fields,
      )
      images[f"p{i}"] = (chosen, rejected)
  return images


def _lines(folder):
  with open(os.path.join(folder, pairs.PAIRS_FILE)) as f:
    return f.read().splitlines()


def _set_lines(folder, lines):
  with open(os.path.join(folder, pairs.PAIRS_FILE), "w") as f:
    f.write("\n".join(lines) + "\n")


def test_an_undecodable_image_is_named(tmp_path):
  _write(tmp_path, 2)
  r = pairs.read_pairs(tmp_path)[1]
  path = tmp_path / r.chosen
  path.write_bytes(path.read_bytes()[:40])  # Truncated mid-file, as a crashed copy leaves it.
  with pytest.raises(OSError, match=re.escape(f"{path}: cannot decode the image")):
    pairs.load_rgb(path)
  with pytest.raises(FileNotFoundError, match="missing.png"):
    pairs.load_rgb(tmp_path / "missing.png")


def test_write_read_round_trip(tmp_path):
  images = _write(tmp_path, 3, split="test", source={"seed": 7, "generator": "render"})
  records = pairs.read_pairs(tmp_path)
  assert [r.id for r in records] == ["p0", "p1", "p2"]
  r = records[1]
  assert r.prompt == "a red cube left of a blue ball 1"
  assert r.perturbed_prompt == "a red cube right of a blue ball 1"
  assert r.relation_changed == "left of -> right of"
  assert (r.split, r.source) == ("test", {"seed": 7, "generator": "render"})
  assert r.chosen == "images/p1_chosen.png"
  np.testing.assert_array_equal(pairs.load_rgb(tmp_path / r.chosen), images["p1"][0])
  np.testing.assert_array_equal(pairs.load_rgb(tmp_path / r.rejected), images["p1"][1])
  assert pairs.PairRecord.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_split_filter_defaults_to_train(tmp_path):
  _write(tmp_path, 2)
  _write(tmp_path, 1, start=2, split="test")
  assert [r.id for r in pairs.read_pairs(tmp_path, split="train")] == ["p0", "p1"]
  assert [r.id for r in pairs.read_pairs(tmp_path, split="test")] == ["p2"]
  assert "split" not in json.loads(_lines(tmp_path)[0])  # Optional fields are left out.


def test_malformed_line_names_file_and_line(tmp_path):
  _write(tmp_path, 2)
  lines = _lines(tmp_path)
  _set_lines(tmp_path, [lines[0], "", "{not json", lines[1]])  # Blank lines still count.
  with pytest.raises(pairs.PairsFormatError, match=r"pairs\.jsonl:3: malformed JSON"):
    pairs.read_pairs(tmp_path)


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda o: o.pop("rejected"), r":2: missing required key 'rejected'"),
    (lambda o: o.update(prompt=3), r":2: key 'prompt' must be a string, got int"),
    (lambda o: o.update(split=""), r":2: key 'split' must be a non-empty string"),
    (lambda o: o.update(source=[1]), r":2: key 'source' must be an object or a string"),
    (lambda o: o.update(splits="test"), r":2: unknown key\(s\) \['splits'\]"),
    (lambda o: o.update(chosen="/abs/x.png"), r":2: key 'chosen' must be a path relative"),
  ],
)
def test_bad_key_names_line_and_key(tmp_path, edit, message):
  _write(tmp_path, 2)
  lines = _lines(tmp_path)
  obj = json.loads(lines[1])
  edit(obj)
  _set_lines(tmp_path, [lines[0], json.dumps(obj)])
  with pytest.raises(pairs.PairsFormatError, match=message):
    pairs.read_pairs(tmp_path)


def test_duplicate_id_names_both_lines(tmp_path):
  _write(tmp_path, 2)
  lines = _lines(tmp_path)
  _set_lines(tmp_path, [*lines, lines[0]])
  with pytest.raises(pairs.PairsFormatError, match=r":3: duplicate id 'p0' \(first on line 1\)"):
    pairs.read_pairs(tmp_path)


def test_missing_image_names_path_and_id(tmp_path):
  _write(tmp_path, 2)
  os.remove(tmp_path / "images" / "p1_rejected.png")
  with pytest.raises(
    pairs.PairsFormatError, match=r":2: pair 'p1': image not found: .*p1_rejected"
  ):
    pairs.read_pairs(tmp_path)
  assert len(pairs.read_pairs(tmp_path, check_images=False)) == 2


def test_missing_folder_and_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="pairs folder not found: .*nowhere"):
    pairs.read_pairs(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"pairs\.jsonl not found"):
    pairs.read_pairs(tmp_path)


def test_writer_rerun_keeps_rows_and_skips_existing_ids(tmp_path):
  _write(tmp_path, 3)
  rng = np.random.default_rng(1)
  added = []
  with pairs.PairsWriter(tmp_path) as writer:
    assert len(writer) == 3 and writer.has("p2") and not writer.has("p3")
    for i in range(5):  # A rerun of the same job: p0..p2 are done already.
      if writer.has(f"p{i}"):
        continue
      added.append(i)
      writer.add(
        id=f"p{i}",
        prompt="p",
        perturbed_prompt="q",
        relation_changed="above",
        chosen_image=Image.fromarray(_image(rng)),
        rejected_image=_image(rng),
      )
    with pytest.raises(pairs.PairsFormatError, match="'p0' already in"):
      writer.add(
        id="p0",
        prompt="p",
        perturbed_prompt="q",
        relation_changed="above",
        chosen_image=_image(rng),
        rejected_image=_image(rng),
      )
  assert added == [3, 4]
  assert [r.id for r in pairs.read_pairs(tmp_path)] == [f"p{i}" for i in range(5)]


def test_truncated_last_line_is_repaired(tmp_path):
  _write(tmp_path, 3)
  with open(tmp_path / pairs.PAIRS_FILE, "a") as f:
    f.write('{"id": "p3", "prompt": "a red cu')  # Torn write of an interrupted run.
  with pytest.raises(pairs.PairsFormatError, match=r":4: malformed JSON.*interrupted write"):
    pairs.read_pairs(tmp_path)
  images = _write(tmp_path, 2, start=3, seed=5)  # Reopening repairs, then p3 is redone.
  records = pairs.read_pairs(tmp_path)
  assert [r.id for r in records] == ["p0", "p1", "p2", "p3", "p4"]
  np.testing.assert_array_equal(pairs.load_rgb(tmp_path / records[3].chosen), images["p3"][0])


def test_complete_last_line_without_newline_is_kept(tmp_path):
  _write(tmp_path, 2)
  with open(tmp_path / pairs.PAIRS_FILE, "rb+") as f:
    f.truncate(os.path.getsize(tmp_path / pairs.PAIRS_FILE) - 1)  # E.g. a hand-written file.
  _write(tmp_path, 1, start=2)
  assert [r.id for r in pairs.read_pairs(tmp_path)] == ["p0", "p1", "p2"]


def test_crash_between_images_and_line_leaves_no_row(tmp_path, monkeypatch):
  _write(tmp_path, 2)
  write_atomic = fileio.write_atomic

  def crash_on_rejected(path, data, **kwargs):
    if path.endswith("_rejected.png"):
      raise KeyboardInterrupt  # The job dies after the chosen image, before its line.
    write_atomic(path, data, **kwargs)

  monkeypatch.setattr(fileio, "write_atomic", crash_on_rejected)
  with pytest.raises(KeyboardInterrupt):
    _write(tmp_path, 1, start=2)
  monkeypatch.undo()
  assert [r.id for r in pairs.read_pairs(tmp_path)] == ["p0", "p1"]
  (tmp_path / "images" / ".p2_rejected.png.k3j_9x.tmp").write_bytes(b"torn")  # Killed mid-write.
  (tmp_path / "images" / "user.tmp-1.png").write_bytes(b"not ours")
  _write(tmp_path, 1, start=2)  # The rerun redoes p2 over its orphan image.
  assert [r.id for r in pairs.read_pairs(tmp_path)] == ["p0", "p1", "p2"]
  assert sorted(p.name for p in (tmp_path / "images").glob("*tmp*")) == ["user.tmp-1.png"]


_KILLED_BATCH_WRITER = """
import os, sys
import numpy as np
from spatial_jax.data import pairs
rng = np.random.default_rng(0)
writer = pairs.PairsWriter(sys.argv[1], sync_every=3)
for i in range(5):
  writer.add(id=f"p{i}", prompt=f"a red cube left of a blue ball {i}",
             perturbed_prompt=f"a red cube right of a blue ball {i}",
             relation_changed="left of -> right of",
             chosen_image=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
             rejected_image=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
os._exit(0)  # Dies with p3, p4 written but not listed: no close, as after kill -9.
"""


def test_batched_durability_loses_only_the_unsynced_pairs(tmp_path):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  batched, single = tmp_path / "batched", tmp_path / "single"
  subprocess.run([sys.executable, "-c", _KILLED_BATCH_WRITER, str(batched)], check=True)
  # The first batch of 3 is listed; p3 and p4 have images but no line.
  assert [r.id for r in pairs.read_pairs(batched)] == ["p0", "p1", "p2"]
  assert (batched / "images" / "p4_chosen.png").exists()
  # The rerun writes p3 and p4 again; the folder is then byte for byte the unbatched one.
  _write(batched, 5, sync_every=3, skip_existing=True)
  _write(single, 5)
  assert _lines(batched) == _lines(single)
  for name in os.listdir(single / "images"):
    assert (batched / "images" / name).read_bytes() == (single / "images" / name).read_bytes()
  with pytest.raises(ValueError, match="sync_every"):
    pairs.PairsWriter(tmp_path / "x", sync_every=0)


def test_one_writer_per_folder(tmp_path):
  with pairs.PairsWriter(tmp_path):
    with pytest.raises(RuntimeError, match="another PairsWriter"):
      pairs.PairsWriter(tmp_path)


def test_writer_rejects_bad_images_and_writes_nothing(tmp_path):
  with pairs.PairsWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match="'p0': bad chosen_image: expected a uint8"):
      writer.add(
        id="p0",
        prompt="p",
        perturbed_prompt="q",
        relation_changed="r",
        chosen_image=np.zeros((8, 8, 3), np.float32),
        rejected_image=np.zeros((8, 8, 3), np.uint8),
      )
  assert pairs.read_pairs(tmp_path) == []


def test_ids_unsafe_for_file_names(tmp_path):
  rng = np.random.default_rng(0)
  with pairs.PairsWriter(tmp_path) as writer:
    for pair_id in ("a/b", "a_b", "../x"):
      writer.add(
        id=pair_id,
        prompt="p",
        perturbed_prompt="q",
        relation_changed="r",
        chosen_image=_image(rng),
        rejected_image=_image(rng),
      )
  records = pairs.read_pairs(tmp_path)
  assert len({r.chosen for r in records}) == 3
  assert all(os.path.dirname(r.chosen) == "images" for r in records)
