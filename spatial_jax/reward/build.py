"""Builds a SpatialScore model, tokenizer and batch preparer from a job config.

One function for training, evaluation and `SpatialScore.load`, so a model is rebuilt
exactly as it was trained. Two worlds (DESIGN.md §2):

- `config.model.pretrained` set: a local Hugging Face Qwen2.5-VL folder (weights, tokenizer,
  preprocessor config); the backbone is loaded sharded and frozen, LoRA is added.
- otherwise: the synthetic world: the `config.model.preset` architecture (e.g. `tiny`) with
  `config.model.vision` / `config.model.text` overrides, random init, the synthetic
  word-level tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import transformers
from absl import logging
from flax import nnx

from spatial_jax import lora, sharding
from spatial_jax.data import tokenizer as synthetic_tokenizer
from spatial_jax.models.qwen25vl import DEFAULT_LORA_TARGETS, Qwen25VLConfig, Qwen25VLModel
from spatial_jax.models.qwen25vl import params as qwen_params
from spatial_jax.models.qwen25vl import processor as qwen_processor
from spatial_jax.reward.model import (
  QWEN_INSTRUCTION,
  REWARD_TOKEN,
  BatchPreparer,
  PromptTemplate,
  SpatialScoreModel,
)


@dataclasses.dataclass
class Built:
  model: SpatialScoreModel
  tokenizer: Any
  preparer: BatchPreparer
  backbone_config: Qwen25VLConfig
  lora_targets: list[str]


def backbone_config(config: Any) -> Qwen25VLConfig:
  """The synthetic-world architecture: a preset plus per-field overrides."""
  presets = {
    "tiny": Qwen25VLConfig.tiny,
    "qwen25vl_3b": Qwen25VLConfig.qwen25vl_3b,
    "qwen25vl_7b": Qwen25VLConfig.qwen25vl_7b,
  }
  if config.model.preset not in presets:
    raise ValueError(
      f"Unknown config.model.preset {config.model.preset!r}; known: {sorted(presets)}"
    )
  base = presets[config.model.preset]()
  vision = dataclasses.replace(base.vision, **_tuples(dict(config.model.vision)))
  text = dataclasses.replace(base.text, **_tuples(dict(config.model.text)))
  return base.replace(vision=vision, text=text, **_runtime(config))


def _tuples(fields: dict[str, Any]) -> dict[str, Any]:
  # ConfigDict stores tuples as lists; the frozen dataclasses want tuples (hashable).
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def _runtime(config: Any) -> dict[str, Any]:
  return dict(
    dtype=config.model.dtype,
    param_dtype=config.model.param_dtype,
    remat=config.model.remat,
    attention_impl=config.model.get("attention_impl") or None,
  )


def tokenizer_for(config: Any, workdir: str | None) -> Any:
  """The real Qwen tokenizer (+ `<reward>`) or the synthetic one (saved in the workdir)."""
  if config.model.pretrained:
    tok = transformers.AutoTokenizer.from_pretrained(config.model.pretrained)
    if REWARD_TOKEN not in tok.get_vocab():
      tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return tok
  directory = os.path.join(workdir, "tokenizer") if workdir else None
  if directory and os.path.exists(os.path.join(directory, "tokenizer.json")):
    return synthetic_tokenizer.load_tokenizer(directory)
  if directory and jax.process_index() == 0:
    synthetic_tokenizer.save_tokenizer(directory)
    return synthetic_tokenizer.load_tokenizer(directory)
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    synthetic_tokenizer.save_tokenizer(tmp)
    return synthetic_tokenizer.load_tokenizer(tmp)


def build(config: Any, workdir: str | None, mesh: jax.sharding.Mesh, rules: Any) -> Built:
  """Model (born sharded on `mesh`), tokenizer and preparer for a reward config."""
  tok = tokenizer_for(config, workdir)
  reward_id = tok.convert_tokens_to_ids(REWARD_TOKEN)
  seed = config.seed
  targets = list(config.model.lora_targets or DEFAULT_LORA_TARGETS)
  use_lora = config.model.trainable == "lora"
  if config.model.preset != "tiny" and not config.model.pretrained:
    raise ValueError(
      f"config.model.preset={config.model.preset!r} needs config.model.pretrained: a local "
      "Hugging Face folder with its weights (nothing is downloaded)."
    )

  def add_reward_parts(backbone: Qwen25VLModel) -> SpatialScoreModel:
    """LoRA (when configured), the `<reward>` embedding and the head, on a backbone."""
    if use_lora:
      lora.apply_lora(
        backbone,
        rank=config.model.lora_rank,
        alpha=config.model.lora_alpha,
        targets=targets,
        rngs=nnx.Rngs(seed + 1),
      )
    return SpatialScoreModel(
      backbone,
      reward_token_id=reward_id,
      head_hidden=config.model.head_hidden,
      grounding=config.train.get("grounding_weight", 0.0) > 0,
      rngs=nnx.Rngs(seed + 2),
    )

  if config.model.pretrained:
    backbone = qwen_params.from_pretrained(
      config.model.pretrained, mesh=mesh, sharding_rules=config.sharding_rules, **_runtime(config)
    )
    bconfig = backbone.config
    image_processor = qwen_processor.ImageProcessor.from_pretrained(config.model.pretrained)
    template = PromptTemplate(
      kind="qwen_chat", instruction=config.model.instruction or QWEN_INSTRUCTION
    )
    # The backbone was placed shard by shard as it was read; only the small new parts remain.
    with sharding.use_mesh(mesh, rules):
      model = add_reward_parts(backbone)
  else:
    bconfig = backbone_config(config)
    image_processor = qwen_processor.ImageProcessor.from_config(bconfig.vision)
    template = PromptTemplate(kind=config.model.get("template", "synthetic"))
    model = sharding.create_sharded(
      lambda: add_reward_parts(Qwen25VLModel(bconfig, rngs=nnx.Rngs(seed))), mesh, rules
    )
  preparer = BatchPreparer(
    bconfig, tok, image_processor, template, max_length=config.data.max_length
  )
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logging.info("SpatialScore: %s backbone, %.2fM params", config.model.preset, params / 1e6)
  return Built(model, tok, preparer, bconfig, targets if use_lora else [])
