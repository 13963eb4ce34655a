"""Qwen2.5-VL configuration: frozen dataclasses with presets and a HF config reader.

The presets carry the checkpoint's `config.json` numbers (qwen25vl_reward.md §3.7),
not transformers' class defaults, which differ (§3.7 "Library defaults differ").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from spatial_jax.models.attention import check_implementation as check_attention


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The ViT tower with window attention and the 2x2 patch merger."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  out_hidden_size: int = 3584
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  # In pixels: 112 px = 8x8 patches = 4x4 merged tokens per window.
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  hidden_act: str = "silu"
  tokens_per_second: int = 2
  # Std of the random init of every kernel (transformers' `initializer_range`). 0.02 is tuned
  # for widths near 1000; a tiny model trained from scratch wants about 1/sqrt(width).
  initializer_range: float = 0.02

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened (C, T, P, P) patch row of `pixel_values`."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    """Patches merged into one language-model token."""
    return self.spatial_merge_size**2

  @property
  def window_merged(self) -> int:
    """Window side in merged tokens (`vit_merger_window_size` in transformers)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 decoder with M-RoPE."""

  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  # Rotary frequencies taken from the (temporal, height, width) position rows.
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02  # Std of the random init of kernels and embeddings.

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """The whole model, plus runtime options that are not part of the checkpoint."""

  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  # Runtime: compute dtype ("float32" / "bfloat16"), parameter dtype, and whether
  # to rematerialise each block in the backward pass.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  # None (the eager fp32-softmax path), "xla", "cudnn", "blockwise" or "tpu_flash"
  # (models/attention.py).
  attention_impl: str | None = None

  def __post_init__(self):
    check_attention(self.attention_impl)
    text, vision = self.text, self.vision
    if text.hidden_size % text.num_attention_heads:
      raise ValueError(f"text hidden_size {text.hidden_size} % heads {text.num_attention_heads}")
    if text.num_attention_heads % text.num_key_value_heads:
      raise ValueError("text num_attention_heads must be a multiple of num_key_value_heads")
    if 2 * sum(text.mrope_section) != text.head_dim:
      raise ValueError(
        f"mrope_section {text.mrope_section} must sum to head_dim/2 = {text.head_dim // 2}"
      )
    if vision.hidden_size % vision.num_heads:
      raise ValueError(f"vision hidden_size {vision.hidden_size} % heads {vision.num_heads}")
    if vision.head_dim % 4:
      raise ValueError("vision head_dim must be divisible by 4 (2D rotary over h and w)")

  def replace(self, **changes: Any) -> Qwen25VLConfig:
    return dataclasses.replace(self, **changes)

  # -- Presets ---------------------------------------------------------------------------------

  @classmethod
  def qwen25vl_7b(cls, **runtime: Any) -> Qwen25VLConfig:
    """Qwen2.5-VL-7B-Instruct (`config.json`, qwen25vl_reward.md §3.7)."""
    return cls(vision=VisionConfig(), text=TextConfig(), **runtime)

  @classmethod
  def qwen25vl_3b(cls, **runtime: Any) -> Qwen25VLConfig:
    """Qwen2.5-VL-3B-Instruct: same vision tower, a 2048-wide 36-layer decoder, tied embeddings."""
    return cls(
      vision=VisionConfig(out_hidden_size=2048),
      text=TextConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
      ),
      **runtime,
    )

  @classmethod
  def tiny(cls, **runtime: Any) -> Qwen25VLConfig:
    """A tiny model for tests and the synthetic world (ids fit a ~100-token vocabulary).

    patch 4 x merge 2 with window 16 px gives 2x2 merged-token windows, so a 32x40 image
    (8x10 patches) has ragged edge windows; block 1 is a full-attention block.
    """
    return cls(
      vision=VisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        out_hidden_size=48,
        patch_size=4,
        window_size=16,
        fullatt_block_indexes=(1,),
      ),
      text=TextConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        mrope_section=(2, 2, 2),
        tie_word_embeddings=True,
      ),
      image_token_id=4,
      video_token_id=5,
      vision_start_token_id=6,
      vision_end_token_id=7,
      **runtime,
    )

  # -- Hugging Face ----------------------------------------------------------------------------

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **runtime: Any) -> Qwen25VLConfig:
    """Reads a Hugging Face `config.json` dict (transformers 4.x flat or 5.x nested layout)."""
    if hf.get("model_type") not in (None, "qwen2_5_vl"):
      raise ValueError(f"Not a Qwen2.5-VL config: model_type={hf.get('model_type')!r}")
    # 4.x puts the text fields at the top level; 5.x nests them in text_config.
    text_hf = {**{k: v for k, v in hf.items() if k != "vision_config"}, **hf.get("text_config", {})}
    vision_hf = dict(hf.get("vision_config") or {})
    rope = dict(text_hf.get("rope_scaling") or {}) | dict(text_hf.get("rope_parameters") or {})
    if "mrope_section" not in rope:
      raise ValueError("Qwen2.5-VL config has no mrope_section (rope_scaling / rope_parameters)")
    tie = hf.get("tie_word_embeddings", text_hf.get("tie_word_embeddings", False))
    text = TextConfig(
      vocab_size=text_hf["vocab_size"],
      hidden_size=text_hf["hidden_size"],
      intermediate_size=text_hf["intermediate_size"],
      num_hidden_layers=text_hf["num_hidden_layers"],
      num_attention_heads=text_hf["num_attention_heads"],
      num_key_value_heads=text_hf["num_key_value_heads"],
      rms_norm_eps=text_hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(rope.get("rope_theta", text_hf.get("rope_theta", 1_000_000.0))),
      mrope_section=tuple(rope["mrope_section"]),
      hidden_act=text_hf.get("hidden_act", "silu"),
      tie_word_embeddings=bool(tie),
      initializer_range=float(text_hf.get("initializer_range", 0.02)),
    )
    vision_rope = dict(vision_hf.get("rope_parameters") or {})
    defaults = VisionConfig()
    vision = VisionConfig(
      depth=vision_hf.get("depth", defaults.depth),
      hidden_size=vision_hf.get("hidden_size", defaults.hidden_size),
      intermediate_size=vision_hf.get("intermediate_size", defaults.intermediate_size),
      num_heads=vision_hf.get("num_heads", defaults.num_heads),
      out_hidden_size=vision_hf.get("out_hidden_size", text.hidden_size),
      in_channels=vision_hf.get("in_channels", vision_hf.get("in_chans", 3)),
      patch_size=vision_hf.get("patch_size", defaults.patch_size),
      temporal_patch_size=vision_hf.get("temporal_patch_size", defaults.temporal_patch_size),
      spatial_merge_size=vision_hf.get("spatial_merge_size", defaults.spatial_merge_size),
      window_size=vision_hf.get("window_size", defaults.window_size),
      fullatt_block_indexes=tuple(
        vision_hf.get("fullatt_block_indexes", defaults.fullatt_block_indexes)
      ),
      rms_norm_eps=vision_hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
      hidden_act=vision_hf.get("hidden_act", "silu"),
      tokens_per_second=vision_hf.get("tokens_per_second", defaults.tokens_per_second),
      initializer_range=float(vision_hf.get("initializer_range", 0.02)),
    )
    ids = {
      key: hf[key]
      for key in (
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
      )
      if key in hf
    }
    return cls(vision=vision, text=text, **ids, **runtime)
