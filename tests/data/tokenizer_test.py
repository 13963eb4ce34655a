"""Tests of the grammar's word-level tokenizer."""

import json
import os

import numpy as np
import transformers

from spatial_jax.data import scenes, tokenizer


def test_vocabulary_covers_the_grammar():
  vocab = tokenizer.vocabulary()
  assert vocab[:6] == ["<pad>", "<unk>", "<bos>", "<eos>", "<image>", "<reward>"]
  assert len(vocab) == len(set(vocab))
  for word in [*scenes.SHAPES, *scenes.COLORS, "left", "right", "above", "below", ".", ","]:
    assert word in vocab


def test_generated_prompts_round_trip_without_unknowns():
  tok = tokenizer.build_tokenizer()
  unk = tok.token_to_id(tokenizer.UNK)
  rng = np.random.default_rng(0)
  for _ in range(500):
    prompt = scenes.scene_to_prompt(scenes.sample_scene(rng), rng)
    encoding = tok.encode(prompt)
    assert unk not in encoding.ids, prompt
    assert tok.decode(encoding.ids) == prompt.lower()


def test_splitting_and_unknown_words():
  tok = tokenizer.build_tokenizer()
  encoding = tok.encode("The RED circle, left of a zebra.")
  assert encoding.tokens == ["the", "red", "circle", ",", "left", "of", "a", "<unk>", "."]


def test_saved_tokenizer_loads_in_transformers(tmp_path):
  path = tokenizer.save_tokenizer(tmp_path)
  assert path == os.path.join(tmp_path, "tokenizer.json")
  assert json.load(open(path))["model"]["type"] == "WordLevel"
  fast = tokenizer.load_tokenizer(tmp_path)
  assert isinstance(fast, transformers.PreTrainedTokenizerFast)
  assert (fast.pad_token_id, fast.unk_token_id, fast.bos_token_id, fast.eos_token_id) == (
    0,
    1,
    2,
    3,
  )
  assert fast.convert_tokens_to_ids([tokenizer.IMAGE, tokenizer.REWARD]) == [4, 5]
  ids = fast("<image> a red circle left of a blue square. <reward>")["input_ids"]
  words = ["a", "red", "circle", "left", "of", "a", "blue", "square", "."]
  assert ids == [4, *fast.convert_tokens_to_ids(words), 5]
  assert fast.decode(ids, skip_special_tokens=True) == "a red circle left of a blue square."
  batch = fast(["a red circle", "a red circle above a blue square"], padding=True)["input_ids"]
  assert len(batch[1]) == 7 and batch[0][3:] == [0] * 4  # padded with <pad>
  # The bare tokenizer file also loads, with the same ids.
  bare = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  assert bare("a red circle left of a blue square.")["input_ids"] == ids[1:-1]
  assert bare.convert_tokens_to_ids(tokenizer.REWARD) == 5
