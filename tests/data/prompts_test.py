import json

import numpy as np
import pytest

from spatial_jax.data import scenes
from spatial_jax.data.prompts import (
  PromptSource,
  mirrored,
  read_prompts,
  scene_pool_prompts,
  synthetic_prompts,
)


def test_read_prompts_text_and_jsonl(tmp_path):
  text = tmp_path / "p.txt"
  text.write_text("# a comment\na cat left of a dog\n\n  a red ball above a box  \n")
  assert read_prompts(text) == ["a cat left of a dog", "a red ball above a box"]
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text(json.dumps({"prompt": "x left of y", "id": 3}) + "\n\n" + '{"prompt": "z"}\n')
  assert read_prompts(jsonl) == ["x left of y", "z"]


def test_read_prompts_errors_name_the_file_and_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    read_prompts(tmp_path / "missing.txt")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    read_prompts(bad)
  broken = tmp_path / "broken.jsonl"
  broken.write_text("{not json\n")
  with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
    read_prompts(broken)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n# only a comment\n")
  with pytest.raises(ValueError, match="no prompts"):
    read_prompts(empty)
  with pytest.raises(IsADirectoryError, match="is a folder"):
    read_prompts(tmp_path)
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("a cat left of a dog\na caf\u00e9 above a box\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1.txt:2: not UTF-8"):
    read_prompts(latin1)
  crlf = tmp_path / "crlf.txt"
  crlf.write_bytes("a caf\u00e9 left of a dog\r\n\r\nz\r\n".encode())
  assert read_prompts(crlf) == ["a caf\u00e9 left of a dog", "z"]


def test_synthetic_prompts_are_deterministic_parse_and_respect_exclude():
  first = synthetic_prompts(20, (3, 0))
  assert first == synthetic_prompts(20, (3, 0)) and first != synthetic_prompts(20, (4, 0))
  for prompt in first:
    assert 1 <= len(scenes.parse_prompt(prompt).relations) <= 4
  kept = synthetic_prompts(20, (3, 0), exclude=set(first[:5]))
  assert not set(kept) & set(first[:5])


def test_prompt_source_holds_out_eval_prompts_and_is_a_function_of_the_step(tmp_path):
  source = PromptSource(seed=0, num_eval=8)
  assert len(source.eval_prompts) == 8
  seen = [p for step in range(1, 40) for p in source.train(step, 4)]
  assert not set(seen) & set(source.eval_prompts)
  again = PromptSource(seed=0, num_eval=8)
  assert again.train(7, 4) == source.train(7, 4) and again.eval_prompts == source.eval_prompts

  pool = tmp_path / "pool.txt"
  pool.write_text("".join(f"prompt {i}\n" for i in range(10)))
  from_file = PromptSource(seed=0, train_file=str(pool), num_eval=3)
  assert from_file.eval_prompts == ["prompt 7", "prompt 8", "prompt 9"]
  batch = from_file.train(1, 5)
  assert len(set(batch)) == 5 and not set(batch) & set(from_file.eval_prompts)
  with pytest.raises(ValueError, match="too few"):
    PromptSource(seed=0, train_file=str(pool), num_eval=10)


def test_long_eval_prompts_are_held_out_multi_relation_prompts_of_the_full_grammar():
  simple = dict(min_objects=2, max_objects=2, max_relations=1)
  source = PromptSource(seed=0, num_eval=8, grammar=simple, num_long_eval=16)
  assert len(source.long_eval_prompts) == len(set(source.long_eval_prompts)) == 16
  assert all(len(scenes.parse_prompt(p).relations) > 1 for p in source.long_eval_prompts)
  assert all(len(scenes.parse_prompt(p).relations) == 1 for p in source.eval_prompts)
  assert PromptSource(seed=0, grammar=simple, num_long_eval=16).long_eval_prompts == (
    source.long_eval_prompts
  )
  assert PromptSource(seed=1, grammar=simple, num_long_eval=16).long_eval_prompts != (
    source.long_eval_prompts
  )
  assert PromptSource(seed=0, grammar=simple).long_eval_prompts == []


def _layout(prompt: str) -> frozenset[tuple[str, str, str]]:
  """What a prompt asks of the layout, in one direction per axis: (colour, left of / above,
  colour), whichever way the prompt states each relation."""
  scene = scenes.parse_prompt(prompt)
  constraints = set()
  for r in scene.relations:
    subject, obj = scene.objects[r.subject].color, scene.objects[r.object].color
    if r.relation in ("left of", "above"):
      constraints.add((subject, r.relation, obj))
    else:
      constraints.add((obj, scenes.OPPOSITE[r.relation], subject))
  return frozenset(constraints)


def _stated(prompt: str) -> frozenset[tuple[str, str, str]]:
  """The relations as the prompt states them: (subject colour, relation, object colour)."""
  scene = scenes.parse_prompt(prompt)
  return frozenset(
    (scene.objects[r.subject].color, r.relation, scene.objects[r.object].color)
    for r in scene.relations
  )


def test_mirrored_states_the_same_layout_from_the_other_object():
  scene = scenes.parse_prompt("a red circle left of a blue square")
  mirror = mirrored(scene)
  assert [o.color for o in mirror.objects] == ["blue", "red"]
  assert mirror.relations == (scenes.Relation(0, "right of", 1),)
  rng = np.random.default_rng(0)
  assert _layout(scenes.scene_to_prompt(mirror, rng)) == _layout(
    "a red circle left of a blue square"
  )


@pytest.mark.parametrize("grammar", [dict(max_objects=2, max_relations=1), dict()])
def test_scene_pool_holds_out_the_mirrored_wording_of_each_scene(grammar):
  train, held_out = scene_pool_prompts(6, 3, (1, 3), **grammar)
  assert (train, held_out) == scene_pool_prompts(6, 3, (1, 3), **grammar)
  assert train != scene_pool_prompts(6, 3, (2, 3), **grammar)[0]
  assert len(train) == len(held_out) == 18 and len(set(train)) == 18
  assert not set(train) & set(held_out)
  colour_sets = []
  for scene in range(6):
    described = train[3 * scene : 3 * scene + 3]
    mirrors = held_out[3 * scene : 3 * scene + 3]
    # Every phrasing of a scene, and of its mirror, asks for the same layout ...
    assert len({_layout(p) for p in described + mirrors}) == 1
    # ... in other words: the mirror states each relation from its other object.
    assert {_stated(p) for p in mirrors} == {
      frozenset((o, scenes.OPPOSITE[r], s) for s, r, o in _stated(p)) for p in described
    }
    colour_sets.append(frozenset(o.color for o in scenes.parse_prompt(described[0]).objects))
  assert len(set(colour_sets)) == 6


def test_scene_pool_errors_and_prompt_source():
  with pytest.raises(ValueError, match="distinct colour sets"):
    scene_pool_prompts(len(scenes.COLORS) ** 2, 1, 0, max_objects=2, max_relations=1)
  with pytest.raises(ValueError, match="num_scenes >= 1"):
    scene_pool_prompts(0, 2, 0)
  with pytest.raises(ValueError, match="give one"):
    PromptSource(seed=0, train_file="prompts.txt", scene_pool=4)
  grammar = dict(min_objects=2, max_objects=2, max_relations=1)
  source = PromptSource(seed=0, num_eval=5, grammar=grammar, scene_pool=4, pool_phrasings=2)
  train, held_out = scene_pool_prompts(4, 2, (0, 3), **grammar)
  # The first phrasing of each of the 4 scenes, then the second phrasing of the first scene.
  assert source.eval_prompts == [held_out[0], held_out[2], held_out[4], held_out[6], held_out[1]]
  assert sorted(source.train_pool) == sorted(train)
  batch = source.train(3, 8)
  assert sorted(batch) == sorted(train) and batch == source.train(3, 8)
