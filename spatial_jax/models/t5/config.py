"""T5 encoder configuration: the transformers `T5Config` fields the encoder uses + runtime options.

Architecture fields carry transformers' names and defaults, so `from_hf_config` reads a
`text_encoder_2/config.json` (FLUX) or a `google/t5-v1_1-*` config as is. The activation is
derived from `feed_forward_proj` exactly as `T5Config.__post_init__` does (a saved
`dense_act_fn` is ignored there too): "gated-gelu" is T5 v1.1's gated tanh-GELU (`gelu_new`),
"relu" the original T5's ungated ReLU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spatial_jax.models.common import ACT2FN, HFConfig


@dataclasses.dataclass(frozen=True)
class T5Config(HFConfig):
  # Architecture (transformers T5Config; defaults are t5-small's, as there).
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"

  # Runtime.
  dtype: str = "float32"  # Compute dtype; layer-norm statistics and softmax are always fp32.
  param_dtype: str = "float32"

  def __post_init__(self):
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(
        f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: use `gated-{{act}}` or `{{act}}`, "
        "e.g. 'gated-gelu' (T5 v1.1) or 'relu' (T5)."
      )
    if self.dense_act_fn not in ACT2FN:
      raise ValueError(
        f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: activation "
        f"{self.dense_act_fn!r} is not one of {sorted(ACT2FN)}."
      )
    if self.relative_attention_num_buckets < 4:
      raise ValueError("T5Config.relative_attention_num_buckets must be at least 4.")
    super().__post_init__()

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    # transformers keeps "gated-gelu" -> gelu_new for backwards compatibility; "gated-X" and
    # "X" otherwise use ACT2FN["X"] ("gelu" being the exact erf GELU).
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @property
  def inner_dim(self) -> int:
    """Width of the concatenated attention heads (num_heads * d_kv; not d_model for XXL)."""
    return self.num_heads * self.d_kv

  def to_hf_config(self, **extra: Any) -> dict[str, Any]:
    """A transformers `config.json` dict of the encoder (what `params.save_pretrained` writes): `from_hf_config` and `transformers.T5Config` read it. `extra` adds or overrides
    entries (e.g. the tokenizer's `pad_token_id` / `eos_token_id`).

    `dropout_rate` is 0: our port has no dropout, so a torch model built from the file in train
    mode computes what ours does. `dtype` is the parameter dtype the weights are written in.
    """
    config = dict(
      architectures=["T5EncoderModel"],
      model_type="t5",
      **super().to_hf_config(),
      num_decoder_layers=self.num_layers,
      dropout_rate=0.0,
      is_encoder_decoder=False,
      use_cache=False,
      dtype=self.param_dtype,
    )
    return {**config, **extra}

  @classmethod
  def t5_v1_1_xxl(cls, **overrides: Any) -> T5Config:
    """google/t5-v1_1-xxl, FLUX.1's `text_encoder_2` (flux.md §13): 24 layers, 64 x 64 heads."""
    fields = dict(
      d_model=4096,
      d_kv=64,
      d_ff=10240,
      num_layers=24,
      num_heads=64,
      feed_forward_proj="gated-gelu",
    )
    return cls(**{**fields, **overrides})
