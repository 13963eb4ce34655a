"""transformers T5 encoder folders <-> `T5EncoderModel`: the key map, loading and writing.

Our module tree carries transformers' names, so the key map is mechanical:
`encoder.block.0.layer.0.SelfAttention.q.weight` ([out, in]) is our transposed
`encoder.block.0.layer.0.SelfAttention.q.kernel`, Embedding `.weight` is `.embedding`, and norm
`.weight` keeps its name. `save_pretrained` writes the same map backwards (a folder that
`transformers.T5EncoderModel.from_pretrained` reads), for encoders trained here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx

from spatial_jax import fileio, hf, sharding
from spatial_jax.models import common
from spatial_jax.models.t5.config import T5Config
from spatial_jax.models.t5.model import T5EncoderModel

_T = hf.transpose()
# A full T5ForConditionalGeneration checkpoint (e.g. google/t5-v1_1-xxl) also holds the decoder
# and the LM head; transformers' T5EncoderModel skips them the same way.
_IGNORED = (r"decoder\..*", r"lm_head\.weight")


def from_pretrained(
  local_dir: str | os.PathLike,
  *,
  dtype: str = "float32",
  param_dtype: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  sharding_rules: Any = None,
) -> T5EncoderModel:
  """Reads a transformers T5 folder (config.json + safetensors, sharded index too).

  Args:
    local_dir: e.g. FLUX.1-dev's `text_encoder_2/` or a `google/t5-v1_1-xxl` snapshot (its
      decoder and lm_head keys are skipped).
    dtype: compute dtype ("float32", "bfloat16").
    param_dtype: parameter dtype (default: `dtype`).
    mesh: place every weight sharded on this mesh as it is read (no full copy per device).
    sharding_rules: logical -> mesh rule overrides (`sharding.resolve_rules`).

  Raises:
    hf.LoadError: missing or unexpected keys (listed), or a shape mismatch (named).
  """
  config = T5Config.from_hf_config(
    hf.read_config(local_dir), dtype=dtype, param_dtype=param_dtype or dtype
  )
  folder = hf.SafetensorsFolder(local_dir)
  return common.load_pretrained(
    T5EncoderModel, config, folder, key_rules, mesh=mesh, sharding_rules=sharding_rules
  )


# --- Checkpoint keys ------------------------------------------------------------------------------


def hf_key_to_path(key: str, our_paths: Collection[str]) -> tuple[str, hf.Transform | None]:
  """Our variable path and transform for a transformers key (unknown keys keep their name, so
  `load_into` reports them as unused)."""
  stem, _, leaf = key.rpartition(".")
  if leaf == "weight":
    if f"{stem}.kernel" in our_paths:  # nn.Linear [out, in] -> nnx.Linear [in, out].
      return f"{stem}.kernel", _T
    if f"{stem}.embedding" in our_paths:  # nn.Embedding -> nnx.Embed, same layout.
      return f"{stem}.embedding", None
  return key, None


def key_rules(keys: Iterable[str], our_paths: Collection[str]) -> list[hf.KeyRule]:
  """One exact rule per checkpoint key, after the skipped decoder / lm_head keys.

  The token embedding is `shared.weight`; `encoder.embed_tokens.weight` is the same tied
  tensor, written by some exports next to it (then skipped) or instead of it (then loaded
  into `shared`). One variable, so no `load_into` alias is needed.
  """
  keys = list(keys)
  rules = [hf.ignore(pattern) for pattern in _IGNORED]
  if "encoder.embed_tokens.weight" in keys:
    target = None if "shared.weight" in keys else "shared.embedding"
    rules.append(hf.KeyRule(r"encoder\.embed_tokens\.weight", target))
  rules += [hf.KeyRule(re.escape(k), *hf_key_to_path(k, our_paths)) for k in keys]
  return rules


# --- Writing --------------------------------------------------------------------------------------


def path_to_hf_key(path: str) -> tuple[str, bool]:
  """The transformers key of one of our variable paths, and whether its array is transposed
  (the inverse of `hf_key_to_path`)."""
  stem, _, leaf = path.rpartition(".")
  if leaf == "kernel":  # nnx.Linear [in, out] -> nn.Linear [out, in].
    return f"{stem}.weight", True
  if leaf == "embedding":
    return f"{stem}.weight", False
  return path, False


def to_hf_state(model: T5EncoderModel) -> dict[str, np.ndarray]:
  """The model's weights as transformers names them (`shared.weight`, `encoder.block.0...`),
  as host numpy arrays in their own dtype. Sharded weights are gathered (every process must
  call it)."""
  out = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = sharding.to_host(variable.get_value())
    key, transposed = path_to_hf_key(".".join(str(p) for p in path))
    out[key] = np.ascontiguousarray(value.T if transposed else value)
  return out


def save_pretrained(
  model: T5EncoderModel, directory: str | os.PathLike, **config_extra: Any
) -> None:
  """Writes a transformers T5 encoder folder (`config.json` + `model.safetensors`) that
  `from_pretrained` and `transformers.T5EncoderModel.from_pretrained` read.

  `config_extra` goes into config.json (e.g. `pad_token_id`, `eos_token_id`). Each file is
  written atomically; every process must call it (sharded weights are gathered), process 0
  writes.
  """
  tensors = to_hf_state(model)
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  hf.save_safetensors(tensors, os.path.join(directory, "model.safetensors"), {"format": "pt"})
  config = json.dumps(model.config.to_hf_config(**config_extra), indent=2, sort_keys=True) + "\n"
  fileio.write_atomic(os.path.join(directory, "config.json"), config.encode())
