"""FLUX transformer configuration: the diffusers `FluxTransformer2DModel` fields + runtime options.

Architecture fields carry diffusers' names and defaults (flux.md §2), so `from_hf_config` reads a
`transformer/config.json` as is. RoPE theta is 10000 and not a field: diffusers hard-codes it, and
maxdiffusion's 1000 is a known parity bug (flux.md §1.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spatial_jax.models.attention import check_implementation as check_attention
from spatial_jax.models.common import HFConfig

# `remat` policies by name (jax.checkpoint_policies); "none" keeps every activation, "full"
# saves nothing inside a block.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class FluxConfig(HFConfig):
  RUNTIME = ("dtype", "param_dtype", "attention_impl", "remat", "scan_layers")

  # Architecture (diffusers FluxTransformer2DModel.__init__).
  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  mlp_ratio: float = 4.0

  # Runtime.
  dtype: str = "float32"  # Compute dtype.
  param_dtype: str = "float32"
  # None (XLA), "xla", "cudnn", "blockwise" or "tpu_flash" (models/attention.py).
  attention_impl: str | None = None
  # Rematerialisation of each block in the backward pass (see REMAT_POLICIES).
  remat: str = "none"
  # Stack each block kind on a leading layer axis and run it with nnx.scan: one block is
  # compiled instead of 19 + 38. Off: an nnx.List of blocks and a Python loop.
  scan_layers: bool = True

  def __post_init__(self):
    super().__post_init__()
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"FluxConfig.remat={self.remat!r}; use one of {REMAT_POLICIES}")
    check_attention(self.attention_impl)
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(
        f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim="
        f"{self.attention_head_dim}"
      )
    if any(d % 2 for d in self.axes_dims_rope):
      raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must all be even")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_hidden_dim(self) -> int:
    return int(self.inner_dim * self.mlp_ratio)

  @property
  def out_features(self) -> int:
    return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

  def to_hf_config(self) -> dict[str, Any]:
    """The diffusers `config.json` fields (architecture only: diffusers has no `mlp_ratio`)."""
    fields = {k: v for k, v in super().to_hf_config().items() if k != "mlp_ratio"}
    return {"_class_name": "FluxTransformer2DModel", **fields}

  @classmethod
  def tiny(cls, **overrides: Any) -> FluxConfig:
    """diffusers' own test config (flux.md §14): 2 heads x 16, one block of each kind."""
    fields = dict(
      in_channels=4,
      num_layers=1,
      num_single_layers=1,
      attention_head_dim=16,
      num_attention_heads=2,
      joint_attention_dim=32,
      pooled_projection_dim=32,
      axes_dims_rope=(4, 4, 8),
    )
    return cls(**{**fields, **overrides})

  @classmethod
  def flux1_dev(cls, **overrides: Any) -> FluxConfig:
    """FLUX.1-dev (flux.md §2): 19 + 38 blocks, 24 x 128 heads, guidance-distilled."""
    return cls(**{"guidance_embeds": True, **overrides})

  @classmethod
  def flux1_schnell(cls, **overrides: Any) -> FluxConfig:
    """FLUX.1-schnell: the FLUX.1-dev architecture without the guidance embedding."""
    return cls(**{"guidance_embeds": False, **overrides})
