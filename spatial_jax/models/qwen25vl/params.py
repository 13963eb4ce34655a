"""Hugging Face Qwen2.5-VL checkpoints -> our NNX model: the key map and `from_pretrained`.

Two key namings exist (qwen25vl_reward.md §3.2): the hub's (`visual.*`, `model.*`,
`lm_head.*`, also what transformers 5 writes with `save_pretrained`) and transformers
5's module names (`model.visual.*`, `model.language_model.*`, `lm_head.*`). Both map
here; PyTorch `[out, in]` weights become our `[in, out]` kernels.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from typing import Any

import jax
from flax import nnx

from spatial_jax import hf
from spatial_jax.models import common
from spatial_jax.models.qwen25vl.config import Qwen25VLConfig
from spatial_jax.models.qwen25vl.model import Qwen25VLModel

_T = hf.transpose()

# HF module prefixes (either naming) -> our top-level modules. Order matters: the
# transformers-5 names are tried before the hub's shorter `model.` prefix.
_PREFIXES = (
  ("model.visual.", "visual."),
  ("visual.", "visual."),
  ("model.language_model.", "language_model."),
  ("model.", "language_model."),
  ("lm_head.", "lm_head."),
)
# Module renames where our attribute names cannot equal HF's (`mlp.0` is not an identifier).
_RENAMES = (
  ("visual.merger.mlp.0.", "visual.merger.mlp_0."),
  ("visual.merger.mlp.2.", "visual.merger.mlp_2."),
  ("language_model.embed_tokens.weight", "language_model.embed_tokens.embedding"),
)


def hf_key_to_path(
  key: str, our_paths: Collection[str], config: Qwen25VLConfig
) -> tuple[str, hf.Transform | None] | None:
  """Our parameter path and the transform for one HF key, or None when it maps to nothing.

  HF calls every parameter `weight`; ours is a transposed `kernel` for Linear layers (and the
  patch embedding, a Conv3d whose stride equals its kernel: a matmul over (C, T, P, P)
  patches) and `weight` for RMSNorm, so the model's own paths decide.
  """
  if key.endswith(".inv_freq"):  # Rotary frequencies are recomputed, never loaded.
    return None
  for hf_prefix, ours in _PREFIXES:
    if key.startswith(hf_prefix):
      path = ours + key[len(hf_prefix) :]
      break
  else:
    return None
  for old, new in _RENAMES:
    path = path.replace(old, new)
  if path == "visual.patch_embed.proj.weight":
    vision = config.vision
    return "visual.patch_embed.proj.kernel", hf.compose(
      hf.reshape(vision.hidden_size, vision.patch_dim), _T
    )
  if path.endswith(".weight") and path[: -len(".weight")] + ".kernel" in our_paths:
    return path[: -len(".weight")] + ".kernel", _T
  return path, None


def key_rules(
  keys: list[str], our_paths: Collection[str], config: Qwen25VLConfig
) -> list[hf.KeyRule]:
  """One exact rule per checkpoint key (keys that map to nothing are left as unexpected)."""
  rules = []
  for key in keys:
    target = hf_key_to_path(key, our_paths, config)
    if target is not None:
      rules.append(hf.KeyRule(re.escape(key), target[0], target[1]))
    elif key.endswith(".inv_freq"):
      rules.append(hf.ignore(re.escape(key)))
  return rules


def from_pretrained(
  local_dir: str | os.PathLike,
  *,
  dtype: str = "float32",
  param_dtype: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  sharding_rules: Any = None,
  **runtime: Any,
) -> Qwen25VLModel:
  """Reads `config.json` + safetensors (single file or sharded index) into `Qwen25VLModel`.

  Args:
    local_dir: a Hugging Face Qwen2.5-VL folder.
    dtype: compute dtype ("float32", "bfloat16").
    param_dtype: parameter dtype (default: `dtype`).
    mesh: place every weight sharded on this mesh as it is read (no full copy per device).
    sharding_rules: logical->mesh rule overrides (see `sharding.resolve_rules`).
    **runtime: other `Qwen25VLConfig` runtime fields (`remat`, `attention_impl`).

  Raises:
    hf.LoadError: missing or unexpected keys (listed), or a shape mismatch (named).
  """
  config = Qwen25VLConfig.from_hf_config(
    hf.read_config(local_dir),
    dtype=dtype,
    param_dtype=param_dtype or dtype,
    **runtime,
  )

  def rules(keys: list[str], shapes: dict[str, tuple[int, ...]]) -> list[hf.KeyRule]:
    rules = key_rules(keys, shapes, config)
    if config.text.tie_word_embeddings and "lm_head.weight" in keys:
      # Some exports keep a copy of the tied head; our tied model reads the embedding table.
      rules.insert(0, hf.ignore(r"lm_head\.weight"))
    return rules

  return common.load_pretrained(
    Qwen25VLModel,
    config,
    hf.SafetensorsFolder(local_dir),
    rules,
    mesh=mesh,
    sharding_rules=sharding_rules,
  )


# Our module paths <-> transformers 5 module names, for PEFT adapters (`lora.hf_name`).
PEFT_NAME_MAP = (
  ("language_model.layers.{i}.{block}.{proj}", "model.language_model.layers.{i}.{block}.{proj}"),
  ("visual.blocks.{i}.{block}.{proj}", "model.visual.blocks.{i}.{block}.{proj}"),
  ("visual.merger.mlp_{j}", "model.visual.merger.mlp.{j}"),
  ("lm_head", "lm_head"),
)
# Adapters trained on transformers < 4.52 name the decoder `model.layers.*`.
_LEGACY_PEFT_NAME_MAP = (
  ("language_model.layers.{i}.{block}.{proj}", "model.layers.{i}.{block}.{proj}"),
  ("visual.blocks.{i}.{block}.{proj}", "visual.blocks.{i}.{block}.{proj}"),
  ("visual.merger.mlp_{j}", "visual.merger.mlp.{j}"),
  ("lm_head", "lm_head"),
)
_PEFT_PREFIX = "base_model.model."


def load_peft_adapter(model, directory: str | os.PathLike, *, rngs: nnx.Rngs | None = None):
  """Applies and loads a PEFT LoRA adapter trained on transformers' Qwen2.5-VL.

  LoRA is applied to exactly the modules the adapter file holds (so PEFT's suffix-style
  `target_modules` need no translation), with the adapter's rank and alpha; the values are
  then loaded and checked by `lora.import_peft`. Returns the adapted module paths.
  """
  from spatial_jax import lora

  config = hf.read_config(directory, lora.CONFIG_NAME)
  hf_modules = sorted(
    {
      key[len(_PEFT_PREFIX) : -len(".lora_A.weight")]
      for key in hf.SafetensorsFolder(os.path.join(directory, lora.WEIGHTS_NAME)).keys()
      if key.startswith(_PEFT_PREFIX) and key.endswith(".lora_A.weight")
    }
  )
  if not hf_modules:
    raise ValueError(f"{directory}: no `{_PEFT_PREFIX}*.lora_A.weight` keys in the adapter")
  name_map = PEFT_NAME_MAP
  if not any(m.startswith(("model.language_model.", "model.visual.")) for m in hf_modules):
    name_map = _LEGACY_PEFT_NAME_MAP
  inverse = [(theirs, ours) for ours, theirs in name_map]
  ours = [lora.hf_name(module, inverse) for module in hf_modules]
  lora.apply_lora(
    model,
    rank=int(config["r"]),
    alpha=float(config["lora_alpha"]),
    targets=[re.escape(path) for path in ours],
    rngs=rngs or nnx.Rngs(0),
  )
  lora.import_peft(model, directory, name_map=name_map, key_prefix=_PEFT_PREFIX)
  return ours
