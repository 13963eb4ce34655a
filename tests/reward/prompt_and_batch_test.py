"""Prompt templates and the host-side batch preparer of SpatialScore."""

import numpy as np
import pytest

from spatial_jax.data import tokenizer as synthetic_tokenizer
from spatial_jax.models.qwen25vl import Qwen25VLConfig
from spatial_jax.models.qwen25vl import processor as qwen_processor
from spatial_jax.reward.model import BatchPreparer, PromptTemplate


@pytest.mark.parametrize(
  "kind, text",
  [
    ("synthetic", "<bos> <image> a red circle left of a blue star <reward>"),
    ("synthetic_text_first", "<bos> a red circle left of a blue star <image> <reward>"),
  ],
)
def test_synthetic_templates(kind, text):
  assert PromptTemplate(kind=kind).format("a red circle left of a blue star") == text


def test_qwen_chat_template_ends_with_the_reward_token_inside_the_user_turn():
  text = PromptTemplate(kind="qwen_chat").format("a cat left of a dog")
  assert text.startswith("<|im_start|>system\n") and "<|image_pad|>" in text
  assert "Prompt: a cat left of a dog\nSpatial score: <reward><|im_end|>" in text


@pytest.mark.parametrize("kind", ["synthetic", "synthetic_text_first"])
def test_preparer_pads_to_max_length_with_one_reward_token_per_row(tmp_path, kind):
  synthetic_tokenizer.save_tokenizer(tmp_path)
  tok = synthetic_tokenizer.load_tokenizer(tmp_path)
  config = Qwen25VLConfig.tiny()
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  preparer = BatchPreparer(
    config,
    tok,
    qwen_processor.ImageProcessor.from_config(config.vision),
    PromptTemplate(kind=kind),
    max_length=48,
  )
  inputs = preparer(list(images), ["a red circle left of a blue star .", "a green cross above ."])
  ids, mask = np.asarray(inputs.input_ids), np.asarray(inputs.attention_mask)
  reward = tok.convert_tokens_to_ids("<reward>")
  assert ids.shape == (2, 48) and (ids == reward).sum(axis=1).tolist() == [1, 1]
  # The reward token is the last real token; 32x32 images give 16 image tokens each.
  assert [int(np.flatnonzero(row == reward)[0]) for row in ids] == (mask.sum(1) - 1).tolist()
  assert (ids == config.image_token_id).sum(axis=1).tolist() == [16, 16]
  with pytest.raises(ValueError, match="max_length 8"):
    BatchPreparer(config, tok, preparer.image_processor, PromptTemplate(kind=kind), max_length=8)(
      list(images), ["a red circle left of a blue star .", "x"]
    )
