"""diffusers `vae/` folders -> `AutoencoderKL`.

Our module tree carries diffusers' names, so the rule table is derived from our own parameter
paths: a conv `X.kernel` (kh, kw, in, out) comes from torch `X.weight` (out, in, kh, kw), a linear
`X.kernel` (in, out) from `X.weight` (out, in), anything else (biases, GroupNorm `weight`/`bias`)
keeps its name and layout. Checkpoints written before diffusers 0.14 name the mid-block attention
`query`/`key`/`value`/`proj_attn`; diffusers renames them on load, and so do we.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import jax

from spatial_jax import hf
from spatial_jax.models import common
from spatial_jax.models.vae.config import VAEConfig
from spatial_jax.models.vae.model import AutoencoderKL

_CONV = hf.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
# (out, in), or (out, in, 1, 1) as some converted LDM checkpoints store the attention -> (in, out).
_LINEAR = hf.compose(lambda x: x.reshape(x.shape[0], -1), hf.transpose())
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def hf_key(path: str) -> str:
  """The diffusers key of one of our variable paths (`X.kernel` -> `X.weight`)."""
  stem, _, leaf = path.rpartition(".")
  return f"{stem}.weight" if leaf == "kernel" else path


def key_rules(our_shapes: dict[str, tuple[int, ...]]) -> list[hf.KeyRule]:
  """One exact rule per variable (path -> shape of the model's), plus the pre-0.14 attention
  names for the mid blocks' projections."""
  rules = []
  for path, shape in sorted(our_shapes.items()):
    transform = None
    if path.endswith(".kernel"):
      transform = _CONV if len(shape) == 4 else _LINEAR
    rules.append(hf.KeyRule(re.escape(hf_key(path)), path, transform))
  for old, new in _DEPRECATED_ATTENTION.items():
    for leaf, ours, transform in (("weight", "kernel", _LINEAR), ("bias", "bias", None)):
      rules.append(
        hf.KeyRule(
          rf"(encoder|decoder)\.mid_block\.attentions\.(\d+)\.{old}\.{leaf}",
          rf"\1.mid_block.attentions.\2.{new}.{ours}",
          transform,
        )
      )
  return rules


def check_class(config: dict[str, Any], where: str | os.PathLike) -> None:
  name = config.get("_class_name")
  if name not in (None, "AutoencoderKL"):
    raise hf.LoadError(
      f"{where}/config.json is a {name}, not an AutoencoderKL; pass the pipeline's `vae/` folder."
    )


def from_pretrained(
  local_dir: str | os.PathLike,
  *,
  dtype: str = "float32",
  param_dtype: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  sharding_rules: Iterable[Any] | None = None,
) -> AutoencoderKL:
  """Reads a diffusers `AutoencoderKL` folder (config.json + safetensors) into our model.

  Args:
    local_dir: the VAE folder, e.g. `FLUX.1-dev/vae`.
    dtype: compute dtype; param_dtype: parameter dtype (default: dtype).
    mesh: place every weight sharded on this mesh as it is read.
    sharding_rules: logical -> mesh rule overrides (`sharding.resolve_rules`).

  Raises:
    hf.LoadError: not an AutoencoderKL config, missing or unexpected keys (listed), or a shape
      mismatch (named).
  """
  local_dir = os.fspath(local_dir)
  raw = hf.read_config(local_dir)
  check_class(raw, local_dir)
  config = VAEConfig.from_hf_config(raw, dtype=dtype, param_dtype=param_dtype or dtype)
  return common.load_pretrained(
    AutoencoderKL,
    config,
    hf.SafetensorsFolder(local_dir),
    lambda _, shapes: key_rules(shapes),
    mesh=mesh,
    sharding_rules=sharding_rules,
  )
