"""CLIP text-tower configuration: transformers' `CLIPTextConfig` fields + runtime options.

Field names and defaults are transformers' own (`CLIPTextConfig.__init__`), so `from_hf_config`
reads a `config.json` as transformers would: a key absent from the file takes the library default.
FLUX's `text_encoder/` is CLIP-L's text tower (`clip_l()`); its `config.json` still carries the
legacy `eos_token_id: 2`, which selects the argmax pooling branch (flux.md §6; see
`CLIPTextModel`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from spatial_jax.models.common import ACT2FN, HFConfig


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(HFConfig):
  # Architecture (transformers CLIPTextConfig defaults).
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # Picks the pooled token: 2 (pre-transformers-PR-#24773 configs) means argmax(input_ids).
  eos_token_id: int = 49407

  # Runtime.
  dtype: str = "float32"  # Compute dtype.
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
        f"{self.num_attention_heads}"
      )
    if self.hidden_act not in ACT2FN:  # CLIP-L's is quick_gelu.
      raise ValueError(
        f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACT2FN)}"
      )
    super().__post_init__()

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **runtime: Any) -> CLIPTextConfig:
    """From a `CLIPTextConfig` dict (`text_encoder/config.json`) or a full `CLIPConfig` dict,
    whose text tower is its `text_config` (`text_config_dict` in old exports). Unknown keys
    (`projection_dim`, `bos_token_id`, ...) are ignored; runtime fields come from `runtime`."""
    if hf.get("model_type") == "clip" or "text_config" in hf or "text_config_dict" in hf:
      hf = hf.get("text_config") or hf.get("text_config_dict") or {}
    return super().from_hf_config({k: v for k, v in hf.items() if v is not None}, **runtime)

  @classmethod
  def clip_l(cls, **overrides: Any) -> CLIPTextConfig:
    """openai/clip-vit-large-patch14's text tower as FLUX.1 ships it (`text_encoder/`)."""
    fields = dict(
      hidden_size=768,
      intermediate_size=3072,
      num_hidden_layers=12,
      num_attention_heads=12,
      eos_token_id=2,
    )
    return cls(**{**fields, **overrides})
