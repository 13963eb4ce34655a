"""The data_synthetic job: determinism, resume after an interruption, validity."""

import filecmp
import json
import os

import numpy as np
import pytest

from spatial_jax.configs_lib import load_config
from spatial_jax.data import oracle, pairs
from spatial_jax.jobs import data_synthetic


def _config(**overrides):
  config = load_config("configs/data_synthetic.py", "smoke")
  config.update({**dict(num_train=12, num_test=4, image_size=32, gallery_pairs=4), **overrides})
  return config


def _same_folders(a, b):
  assert (a / "pairs.jsonl").read_bytes() == (b / "pairs.jsonl").read_bytes()
  names = sorted(os.listdir(a / "images"))
  assert names == sorted(os.listdir(b / "images"))
  _, mismatch, errors = filecmp.cmpfiles(a / "images", b / "images", names, shallow=False)
  assert not mismatch and not errors


def test_deterministic_given_seed_and_different_across_seeds(tmp_path):
  data_synthetic.run(_config(), str(tmp_path / "a"))
  data_synthetic.run(_config(), str(tmp_path / "b"))
  _same_folders(tmp_path / "a", tmp_path / "b")
  data_synthetic.run(_config(seed=1), str(tmp_path / "c"))
  prompts_a = [r.prompt for r in pairs.read_pairs(tmp_path / "a")]
  prompts_c = [r.prompt for r in pairs.read_pairs(tmp_path / "c")]
  assert sum(p == q for p, q in zip(prompts_a, prompts_c, strict=True)) < 3


def test_rerun_after_interruption_resumes_without_duplicates(tmp_path):
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  data_synthetic.run(_config(), str(full))
  # An interrupted build: only part of the train split, and a torn last line.
  stats = data_synthetic.run(_config(num_train=5, num_test=0), str(resumed))
  assert stats["written_by_this_run"] == 5
  with open(resumed / "pairs.jsonl", "ab") as f:
    f.write(b'{"id": "train-000005", "prompt": "a red ci')
  stats = data_synthetic.run(_config(), str(resumed))
  assert stats["written_by_this_run"] == 11 and stats["num_pairs"] == 16
  _same_folders(full, resumed)
  # A complete rerun writes nothing and keeps every row.
  assert data_synthetic.run(_config(), str(resumed))["written_by_this_run"] == 0
  assert len(pairs.read_pairs(resumed)) == 16


@pytest.mark.slow  # Starts a pool of spawned worker processes.
def test_pairs_made_on_worker_processes_equal_one_process(tmp_path, monkeypatch):
  data_synthetic.run(_config(recolour_fraction=0.25), str(tmp_path / "one"))
  monkeypatch.setattr(data_synthetic, "_PARALLEL_MIN_PAIRS", 2)
  monkeypatch.setattr(data_synthetic, "_BLOCK", 5)  # Several blocks, the last one partial.
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  data_synthetic.run(_config(recolour_fraction=0.25), str(tmp_path / "workers"))
  _same_folders(tmp_path / "one", tmp_path / "workers")


def test_pairs_differ_in_exactly_one_relation_of_the_prompt(tmp_path):
  data_synthetic.run(_config(image_size=64), str(tmp_path))
  records = pairs.read_pairs(tmp_path)
  for r in records:
    chosen = oracle.score_prompt(pairs.load_rgb(tmp_path / r.chosen), r.prompt)
    rejected = oracle.score_prompt(pairs.load_rgb(tmp_path / r.rejected), r.prompt)
    assert all(chosen.satisfied), r.id
    assert sum(not s for s in rejected.satisfied) == 1, (r.id, rejected.satisfied)
    assert r.source["change_type"] in ("horizontal", "vertical")
  gallery = pairs.load_rgb(tmp_path / "gallery.png")
  assert gallery.shape[0] > 2 * 64 and gallery.shape[1] > 4 * 64
  assert np.unique(gallery.reshape(-1, 3), axis=0).shape[0] > 50


def test_bad_counts_are_refused(tmp_path):
  with pytest.raises(ValueError, match="num_train"):
    data_synthetic.run(_config(num_train=-1), str(tmp_path))


def test_rerun_with_other_generator_settings_is_refused(tmp_path):
  data_synthetic.run(_config(), str(tmp_path))
  with pytest.raises(ValueError, match=r"other settings.*image_size.*\(32, 48\)"):
    data_synthetic.run(_config(image_size=48), str(tmp_path))
  with pytest.raises(ValueError, match="not both 0"):
    data_synthetic.run(_config(num_train=0, num_test=0), str(tmp_path / "empty"))
  assert len(pairs.read_pairs(tmp_path)) == 16  # Nothing written was lost.


def test_layout_candidates_are_recorded_and_older_folders_read_as_one(tmp_path):
  data_synthetic.run(_config(), str(tmp_path))
  record = tmp_path / "generator.json"
  fields = json.loads(record.read_text())
  assert fields["layout_candidates"] == 1
  del fields["layout_candidates"]  # A folder written before the field existed.
  record.write_text(json.dumps(fields))
  data_synthetic.run(_config(), str(tmp_path))  # Same settings: accepted.
  with pytest.raises(ValueError, match=r"layout_candidates.*\(1, 8\)"):
    data_synthetic.run(_config(layout_candidates=8), str(tmp_path))


def test_recoloured_pairs_lack_one_named_object_and_leave_relation_pairs_as_they_were(tmp_path):
  data_synthetic.run(_config(num_train=24, image_size=64), str(tmp_path / "plain"))
  data_synthetic.run(
    _config(num_train=24, image_size=64, recolour_fraction=0.5), str(tmp_path / "mix")
  )
  plain = {r.id: r for r in pairs.read_pairs(tmp_path / "plain")}
  recoloured = 0
  for r in pairs.read_pairs(tmp_path / "mix"):
    assert r.prompt == plain[r.id].prompt  # The scene and its wording are drawn first.
    if r.source["change_type"] != "colour":
      assert r.perturbed_prompt == plain[r.id].perturbed_prompt
      continue
    recoloured += 1
    chosen = oracle.score_prompt(pairs.load_rgb(tmp_path / "mix" / r.chosen), r.prompt)
    rejected = oracle.score_prompt(pairs.load_rgb(tmp_path / "mix" / r.rejected), r.prompt)
    assert all(chosen.satisfied) and all(chosen.found)
    assert sum(not f for f in rejected.found) == 1, r.id  # The old colour is gone...
    # ... and under its own prompt the rejected image is right: it differs in one colour word.
    assert all(
      oracle.score_prompt(
        pairs.load_rgb(tmp_path / "mix" / r.rejected), r.perturbed_prompt
      ).satisfied
    )
    # Each mention of the object changes its colour word (and "a"/"an" before it), nothing else.
    differ = {
      (a, b)
      for a, b in zip(r.prompt.split(), r.perturbed_prompt.split(), strict=True)
      if a != b and {a.lower(), b.lower()} != {"a", "an"}
    }
    old, _, new = r.source["change"].partition(" -> ")
    assert differ == {(old, new)}, (r.prompt, r.perturbed_prompt)
  assert 4 <= recoloured <= 24
  assert json.loads((tmp_path / "mix" / "generator.json").read_text())["recolour_fraction"] == 0.5


def test_pairs_with_several_changes_record_them_and_one_change_folders_stay_as_they_were(tmp_path):
  data_synthetic.run(_config(num_train=32, image_size=64), str(tmp_path / "one"))
  stats = data_synthetic.run(
    _config(num_train=32, image_size=64, max_changes=3, min_objects=3, max_relations=4),
    str(tmp_path / "many"),
  )
  counts = stats["num_changes"]
  assert set(counts) <= {"1", "2", "3"} and counts.get("2", 0) + counts.get("3", 0) >= 8, counts
  for r in pairs.read_pairs(tmp_path / "many"):
    changes = r.source["num_changes"]
    assert len(r.relation_changed.split("; ")) == changes
    rejected = oracle.score_prompt(pairs.load_rgb(tmp_path / "many" / r.rejected), r.prompt)
    assert sum(not s for s in rejected.satisfied) == changes, (r.id, rejected.satisfied)
  # The default changes one relation per pair, and a folder keeps the count it was made with.
  assert all(r.source["num_changes"] == 1 for r in pairs.read_pairs(tmp_path / "one"))
  with pytest.raises(ValueError, match=r"max_changes.*\(1, 3\)"):
    data_synthetic.run(_config(num_train=32, image_size=64, max_changes=3), str(tmp_path / "one"))


def test_other_scene_negatives_show_another_scene_and_bad_kinds_are_named(tmp_path):
  data_synthetic.run(_config(num_train=16, image_size=64), str(tmp_path / "adv"))
  stats = data_synthetic.run(
    _config(num_train=16, image_size=64, rejected="other_scene"), str(tmp_path / "other")
  )
  assert stats["change_type"] == {"other_scene": 20}
  adversarial = {r.id: r for r in pairs.read_pairs(tmp_path / "adv")}
  for r in pairs.read_pairs(tmp_path / "other"):
    assert r.prompt == adversarial[r.id].prompt  # The scene and its wording are drawn first.
    assert r.perturbed_prompt != r.prompt and r.relation_changed == "another scene"
    chosen = oracle.score_prompt(pairs.load_rgb(tmp_path / "other" / r.chosen), r.prompt)
    rejected = oracle.score_prompt(
      pairs.load_rgb(tmp_path / "other" / r.rejected), r.perturbed_prompt
    )
    assert all(chosen.satisfied) and all(rejected.satisfied)  # Each image shows its own prompt.
  with pytest.raises(ValueError, match="config.rejected='others'"):
    data_synthetic.run(_config(rejected="others"), str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="max_changes must be >= 1"):
    data_synthetic.run(_config(max_changes=0), str(tmp_path / "bad"))
