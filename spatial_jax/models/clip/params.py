"""transformers `CLIPTextModel` folders -> our `CLIPTextModel`: the key rules and loading.

Module attributes carry the hub checkpoint's names, so the key map is mechanical: a torch Linear
`[out, in]` weight is our transposed `[in, out]` kernel, everything else keeps its name.
transformers 5 itself drops the `text_model.` prefix when it saves a CLIPTextModel
(`PrefixChange(prefix_to_remove="text_model")` in its conversion mapping); both namings load.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from spatial_jax import hf
from spatial_jax.models import common
from spatial_jax.models.clip.config import CLIPTextConfig
from spatial_jax.models.clip.model import CLIPTextModel

_T = hf.transpose()
_PREFIX = r"(?:text_model\.)?"  # The hub's naming; transformers 5's save_pretrained drops it.
_LINEARS = r"encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"

# HF key -> our path. Anything else (a CLIPModel's `vision_model.*`, `text_projection.weight`,
# `logit_scale`) matches no rule and is reported as unexpected.
KEY_RULES = (
  # A non-persistent buffer that older transformers wrote out; positions are recomputed.
  hf.ignore(_PREFIX + r"embeddings\.position_ids"),
  hf.KeyRule(_PREFIX + rf"({_LINEARS})\.weight", r"text_model.\1.kernel", _T),
  hf.KeyRule(_PREFIX + r"((?:embeddings|encoder|final_layer_norm)\..+)", r"text_model.\1"),
)


def from_pretrained(
  local_dir: str | os.PathLike,
  *,
  dtype: str = "float32",
  param_dtype: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  sharding_rules: Any = None,
) -> CLIPTextModel:
  """Reads a transformers `CLIPTextModel` folder (`config.json` + safetensors, e.g. FLUX's
  `text_encoder/`) into `CLIPTextModel`.

  Args:
    local_dir: the folder. A full `CLIPModel` folder is refused (its vision tower and
      projections are unexpected keys); pass a text-only export.
    dtype: compute dtype ("float32", "bfloat16"); param_dtype: parameter dtype (default
      `dtype`).
    mesh: place every weight sharded on this mesh as it is read (no full copy per device).
    sharding_rules: logical -> mesh rule overrides (`sharding.resolve_rules`).

  Raises:
    hf.LoadError: missing or unexpected keys (listed), or a shape mismatch (named).
  """
  config = CLIPTextConfig.from_hf_config(
    hf.read_config(local_dir), dtype=dtype, param_dtype=param_dtype or dtype
  )
  return common.load_pretrained(
    CLIPTextModel,
    config,
    hf.SafetensorsFolder(local_dir),
    lambda *_: KEY_RULES,
    mesh=mesh,
    sharding_rules=sharding_rules,
  )
