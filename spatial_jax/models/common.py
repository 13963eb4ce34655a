"""The model-building kit every family shares: the linear layer, the activation table, the
config mixin and the tail of `from_pretrained`.

A family (`flux`, `t5`, `clip`, `vae`, `qwen25vl`) keeps what is its own: its modules in
`model.py` (and `layers.py` / `blocks.py`), its config in `config.py`, its checkpoint key
rules and loader in `params.py`. What they all did the same way lives here once.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax.numpy as jnp
from flax import nnx

Names = tuple[str | None, str | None]


class HasDtypes(Protocol):
  """What `linear` reads off a family's config: the compute and the parameter dtype."""

  dtype: Any
  param_dtype: Any


class Dtypes(NamedTuple):
  """`HasDtypes` for layers that follow no model config."""

  dtype: Any
  param_dtype: Any


FP32 = Dtypes("float32", "float32")


def linear(
  in_features: int,
  out_features: int,
  names: Names,
  config: HasDtypes,
  rngs: nnx.Rngs,
  *,
  use_bias: bool = True,
  init_std: float | None = None,
) -> nnx.Linear:
  """An `nnx.Linear` computed in `config.dtype`, its parameters in `config.param_dtype`.

  The kernel (in, out) carries the logical axis `names`, the bias `(names[1],)`. The kernel is
  drawn LeCun-normal, or from N(0, init_std^2) when `init_std` is given (transformers'
  `initializer_range`); the bias starts at 0. A torch `[out, in]` weight is its transposed
  kernel.
  """
  kernel_init = (
    nnx.initializers.lecun_normal() if init_std is None else nnx.initializers.normal(init_std)
  )
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=use_bias,
    dtype=jnp.dtype(config.dtype),
    param_dtype=jnp.dtype(config.param_dtype),
    kernel_init=nnx.with_partitioning(kernel_init, names),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
    rngs=rngs,
  )
