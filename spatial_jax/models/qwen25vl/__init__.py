"""Qwen2.5-VL in Flax NNX: vision tower, M-RoPE decoder, processor, HF checkpoint loading."""

from spatial_jax.models.qwen25vl.config import Qwen25VLConfig, TextConfig, VisionConfig
from spatial_jax.models.qwen25vl.model import (
  DEFAULT_LORA_TARGETS,
  ModelInputs,
  Qwen25VLModel,
  Qwen25VLOutput,
  prepare_inputs,
)
from spatial_jax.models.qwen25vl.params import from_pretrained
from spatial_jax.models.qwen25vl.processor import ImageProcessor, build_prompt_ids, chat_prompt

__all__ = [
  "DEFAULT_LORA_TARGETS",
  "ImageProcessor",
  "ModelInputs",
  "Qwen25VLConfig",
  "Qwen25VLModel",
  "Qwen25VLOutput",
  "TextConfig",
  "VisionConfig",
  "build_prompt_ids",
  "chat_prompt",
  "from_pretrained",
  "prepare_inputs",
]
