import json

import pytest

from spatial_jax.data import scenes
from spatial_jax.data.prompts import PromptSource, read_prompts, synthetic_prompts


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
