"""VAE configuration: the diffusers `AutoencoderKL` fields + runtime options.

Architecture fields carry diffusers' names and defaults, so `from_hf_config` reads a
`vae/config.json` as is. `flux1()` is the FLUX.1 VAE (flux.md §7): 4 levels (x8 downsampling),
16 latent channels, no quant convs, latents shifted by 0.1159 then scaled by 0.3611.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spatial_jax.models.common import HFConfig

# The only block kinds the diffusers `Encoder`/`Decoder` of an AutoencoderKL use in practice (SD,
# SDXL, SD3, FLUX); the attention variants (`AttnDownEncoderBlock2D`) are not ported.
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers `get_activation` names (all in common.ACT2FN; "swish" is SiLU too).
ACTIVATIONS = ("silu", "swish", "gelu", "relu", "mish")


@dataclasses.dataclass(frozen=True)
class VAEConfig(HFConfig):
  """diffusers `AutoencoderKL.__init__` arguments (same names, same defaults).

  `latents_mean` / `latents_std` of diffusers' config are not fields: the model never reads them
  (only some pipelines do, and FLUX's sets neither). `force_upcast` is kept for pipelines that
  want to honour it (diffusers runs such a VAE in fp32 when the pipeline is in fp16); the model
  computes in `dtype` regardless.
  """

  # Architecture (diffusers AutoencoderKL.__init__).
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
  up_block_types: tuple[str, ...] = (UP_BLOCK,)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  # Runtime.
  dtype: str = "float32"  # Compute dtype (GroupNorm statistics and softmax stay in fp32).
  param_dtype: str = "float32"

  def __post_init__(self):
    super().__post_init__()
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      value = getattr(self, name)
      if not isinstance(value, tuple):
        object.__setattr__(self, name, tuple(value))
    if isinstance(self.sample_size, list):
      object.__setattr__(self, "sample_size", tuple(self.sample_size))
    levels = len(self.block_out_channels)
    if levels == 0:
      raise ValueError("VAEConfig.block_out_channels must not be empty")
    if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
      raise ValueError(
        f"VAEConfig: {len(self.down_block_types)} down and {len(self.up_block_types)} up block "
        f"types for {levels} block_out_channels; diffusers needs one of each per level"
      )
    for kind, allowed in ((self.down_block_types, DOWN_BLOCK), (self.up_block_types, UP_BLOCK)):
      if any(k != allowed for k in kind):
        raise ValueError(f"VAEConfig: only {allowed} blocks are supported, got {kind}")
    if self.act_fn not in ACTIVATIONS:
      raise ValueError(f"VAEConfig.act_fn={self.act_fn!r}; use one of {ACTIVATIONS}")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(
        f"VAEConfig: block_out_channels {bad} not divisible by norm_num_groups="
        f"{self.norm_num_groups} (GroupNorm)"
      )

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each axis (diffusers pipelines' `vae_scale_factor`)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def flux1(cls, **overrides: Any) -> VAEConfig:
    """The FLUX.1 (dev and schnell) VAE, `black-forest-labs/FLUX.1-dev/vae` (flux.md §7)."""
    fields = dict(
      down_block_types=(DOWN_BLOCK,) * 4,
      up_block_types=(UP_BLOCK,) * 4,
      block_out_channels=(128, 256, 512, 512),
      layers_per_block=2,
      latent_channels=16,
      norm_num_groups=32,
      sample_size=1024,
      scaling_factor=0.3611,
      shift_factor=0.1159,
      force_upcast=True,
      use_quant_conv=False,
      use_post_quant_conv=False,
      mid_block_add_attention=True,
    )
    return cls(**{**fields, **overrides})
