"""SpatialScore: Qwen2.5-VL + a `<reward>` token + a Gaussian (mu, sigma) head.

The prompt ends with `<reward>`; the decoder's last hidden state at that token goes
through `RewardHead`. The token's input embedding is its own trainable parameter
(`reward_embedding`), spliced in at the token's position, so the (frozen) embedding
table never needs a new row or a partial-update trick (HPSv3 restores every other row
after each step, qwen25vl_reward.md §4.1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax.models.common import FP32, linear
from spatial_jax.models.qwen25vl import ModelInputs, Qwen25VLModel, prepare_inputs
from spatial_jax.models.qwen25vl import processor as qwen_processor
from spatial_jax.reward.head import RewardHead

REWARD_TOKEN = "<reward>"

# The default instruction for a real Qwen2.5-VL: the chat turn with the image, what to
# judge, the prompt, then the reward token (HPSv3's layout, §4.1, with a spatial brief).
QWEN_INSTRUCTION = (
  "You are given an image generated from a text prompt. Judge only whether the objects and "
  "their spatial relations (left, right, above, below, in front of, behind, on, under) in the "
  "image match the prompt.\nPrompt: {prompt}\nSpatial score: " + REWARD_TOKEN
)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """How a text prompt becomes the model's token sequence (one image placeholder)."""

  # "synthetic": `<bos> <image> {prompt} <reward>`; "synthetic_text_first":
  # `<bos> {prompt} <image> <reward>` (the image tokens can attend to the named objects);
  # "qwen_chat": the Qwen2.5-VL chat turn with `instruction`.
  kind: str = "synthetic"
  instruction: str = QWEN_INSTRUCTION

  def format(self, prompt: str) -> str:
    if self.kind == "synthetic":
      return qwen_processor.synthetic_prompt(prompt, reward_token=True)
    if self.kind == "synthetic_text_first":
      bos, image = qwen_processor.SYNTHETIC_BOS, qwen_processor.SYNTHETIC_IMAGE
      return f"{bos} {prompt} {image} {REWARD_TOKEN}"
    if self.kind == "qwen_chat":
      return qwen_processor.chat_prompt(self.instruction.format(prompt=prompt))
    raise ValueError(
      f"Unknown prompt template {self.kind!r}; use synthetic, synthetic_text_first or qwen_chat"
    )

  @property
  def image_token(self) -> str:
    if self.kind.startswith("synthetic"):
      return qwen_processor.SYNTHETIC_IMAGE
    return qwen_processor.IMAGE_PAD


class SpatialScoreModel(nnx.Module):
  """`(ModelInputs) -> (mu, sigma)` per sequence."""

  def __init__(
    self,
    backbone: Qwen25VLModel,
    *,
    reward_token_id: int,
    head_hidden: int = 1024,
    grounding: bool = False,
    rngs: nnx.Rngs,
  ):
    self.backbone = backbone
    self.reward_token_id = reward_token_id
    hidden = backbone.config.text.hidden_size
    table = backbone.language_model.embed_tokens.embedding
    # Start from the mean embedding: a neutral, in-distribution input for a new token.
    init = jnp.mean(table[...].astype(jnp.float32), axis=0)
    self.reward_embedding = nnx.Param(
      nnx.with_partitioning(lambda *_: init, ("embed",))(None, (hidden,), jnp.float32)
    )
    self.head = RewardHead(hidden, head_hidden, rngs=rngs)
    # Training only: the colour-grounding auxiliary's (x, y) readout (reward.grounding).
    self.grounding_head = linear(hidden, 2, ("embed", None), FP32, rngs) if grounding else None

  def __call__(self, inputs: ModelInputs) -> tuple[jax.Array, jax.Array]:
    mu, sigma, _ = self.forward(inputs)
    return mu, sigma

  def forward(self, inputs: ModelInputs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mu, sigma, the decoder's last hidden states (N, L, hidden))."""
    return self.forward_with_embeds(inputs)[:3]

  def forward_with_embeds(self, inputs: ModelInputs) -> tuple[jax.Array, ...]:
    """(mu, sigma, last hidden states, the decoder's input embeddings (N, L, hidden)): at the
    image tokens the embeddings are the vision tower's output."""
    backbone = self.backbone
    embeds = backbone.embed_inputs(inputs)
    is_reward = inputs.input_ids == self.reward_token_id
    reward = self.reward_embedding[...].astype(embeds.dtype)
    embeds = jnp.where(is_reward[..., None], reward, embeds)
    hidden = backbone.language_model(embeds, inputs.position_ids, inputs.attention_mask)
    # The last `<reward>` of each row (prepare_batch checks there is one).
    length = is_reward.shape[1]
    last = length - 1 - jnp.argmax(is_reward[:, ::-1], axis=1)
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    mu, sigma = self.head(pooled)
    return mu, sigma, hidden, embeds


def trainable_filter(mode: str) -> nnx.filterlib.Filter:
  """What the optimizer updates: `lora` (adapters + head + reward token) or `all`."""
  head_and_token = nnx.Any(
    nnx.PathContains("head"),
    nnx.PathContains("grounding_head"),
    nnx.PathContains("reward_embedding"),
  )
  if mode == "lora":
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, head_and_token))
  if mode == "all":
    return nnx.Param
  raise ValueError(f"Unknown trainable mode {mode!r} (config.model.trainable); use 'lora' or 'all'")


class BatchPreparer:
  """Host side: images + prompts -> `ModelInputs` with a fixed padded length (one compile)."""

  def __init__(
    self,
    config,
    tokenizer,
    image_processor: qwen_processor.ImageProcessor,
    template: PromptTemplate,
    *,
    max_length: int,
  ):
    self.config = config
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.template = template
    self.max_length = max_length
    self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    if self.reward_token_id is None or self.reward_token_id == tokenizer.unk_token_id:
      raise ValueError(f"The tokenizer has no {REWARD_TOKEN} token; add it (see reward.tokens)")

  def __call__(self, images: Sequence[Any], prompts: Sequence[str]) -> ModelInputs:
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    vision = self.image_processor(list(images))
    texts = [self.template.format(str(p)) for p in prompts]
    ids = qwen_processor.build_prompt_ids(
      self.tokenizer,
      texts,
      vision["image_grid_thw"],
      merge_size=self.config.vision.spatial_merge_size,
      image_token=self.template.image_token,
      padding_side="right",
      pad_token_id=self.tokenizer.pad_token_id or 0,
    )
    input_ids, mask = ids["input_ids"], ids["attention_mask"]
    if input_ids.shape[1] > self.max_length:
      raise ValueError(
        f"A prompt needs {input_ids.shape[1]} tokens > max_length {self.max_length} "
        "(config.data.max_length); raise it"
      )
    pad = self.max_length - input_ids.shape[1]
    input_ids = np.pad(input_ids, ((0, 0), (0, pad)), constant_values=self.tokenizer.pad_token_id)
    mask = np.pad(mask, ((0, 0), (0, pad)))
    missing = ~((input_ids == self.reward_token_id) & (mask == 1)).any(axis=1)
    if missing.any():
      raise ValueError(f"Rows {np.flatnonzero(missing).tolist()} have no {REWARD_TOKEN} token")
    return prepare_inputs(
      self.config, input_ids, mask, vision["pixel_values"], vision["image_grid_thw"]
    )
