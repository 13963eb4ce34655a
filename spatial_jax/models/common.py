"""The model-building kit every family shares: the linear layer, the activation table, the
config mixin and the tail of `from_pretrained`.

A family (`flux`, `t5`, `clip`, `vae`, `qwen25vl`) keeps what is its own: its modules in
`model.py` (and `layers.py` / `blocks.py`), its config in `config.py`, its checkpoint key
rules and loader in `params.py`. What they all did the same way lives here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, Self, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from spatial_jax import hf, sharding

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


# --- Activations ----------------------------------------------------------------------------------

# transformers' ACT2FN entries by name (diffusers' `get_activation` names are among them, with
# the same functions): "gelu" is torch's exact erf GELU, "gelu_new" / "gelu_pytorch_tanh" the
# tanh form, "swish" is SiLU.
ACT2FN: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation a config names (`hidden_act`, `act_fn`, ...).

  Raises:
    ValueError: a name `ACT2FN` does not hold.
  """
  if name not in ACT2FN:
    raise ValueError(f"Unknown activation {name!r}; use one of {sorted(ACT2FN)}.")
  return ACT2FN[name]


# --- Configs --------------------------------------------------------------------------------------


class HFConfig:
  """What a family's frozen config dataclass shares: its architecture fields carry the names and
  defaults of the reference library's `config.json`; `RUNTIME` names the fields no checkpoint
  holds (the compute and parameter dtype, and the family's own options).

  A subclass that defines `__post_init__` calls `super().__post_init__()`.
  """

  RUNTIME: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype")

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      jnp.dtype(getattr(self, name))  # Fails early on a misspelt dtype ("bf16").

  def replace(self, **changes: Any) -> Self:
    return dataclasses.replace(self, **changes)

  @classmethod
  def architecture(cls) -> tuple[str, ...]:
    """The fields a `config.json` holds: every dataclass field that is not in `RUNTIME`."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.RUNTIME)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **runtime: Any) -> Self:
    """From a `config.json` dict. Keys that are no architecture field (`_class_name`,
    `torch_dtype`, ...) are ignored and lists become tuples; runtime fields come from `runtime`.

    Raises:
      TypeError: a `runtime` name that is not in `RUNTIME`.
    """
    unknown = set(runtime) - set(cls.RUNTIME)
    if unknown:
      raise TypeError(f"{cls.__name__}.from_hf_config: unknown runtime fields {sorted(unknown)}.")
    names = set(cls.architecture())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in hf.items() if k in names}
    return cls(**fields, **runtime)

  def to_hf_config(self) -> dict[str, Any]:
    """The architecture fields as a `config.json` holds them (tuples as lists)."""
    fields = {name: getattr(self, name) for name in self.architecture()}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


# --- Loading --------------------------------------------------------------------------------------

M = TypeVar("M", bound=nnx.Module)
# (The checkpoint's keys, the model's variables as dotted path -> shape) -> the family's rules.
KeyRules = Callable[[list[str], dict[str, tuple[int, ...]]], Sequence[hf.KeyRule]]


def abstract_model(model_class: Callable[..., M], config: Any) -> M:
  """`model_class(config, rngs=...)` as shapes, dtypes and logical axis names: no memory."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))


def variable_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Every variable of `model` by dotted path (`encoder.block.0.layer.0.SelfAttention.q.kernel`),
  with its shape."""
  return {
    ".".join(str(p) for p in path): tuple(var.shape)
    for path, var in nnx.to_flat_state(nnx.state(model))
  }


def load_pretrained(
  model_class: Callable[..., M],
  config: Any,
  folder: Any,
  key_rules: KeyRules,
  *,
  mesh: Mesh | None = None,
  sharding_rules: Any = None,
) -> M:
  """The tail of every family's `params.from_pretrained`: builds `model_class(config)`
  abstractly, derives the key rules from the checkpoint's keys and the model's variables, and
  fills the model from `folder` one tensor at a time.

  Args:
    model_class: the family's model, called as `model_class(config, rngs=...)`.
    config: its config; the weights are stored in `config.param_dtype`.
    folder: an `hf.SafetensorsFolder`, or a view with its `keys`, `read` and `path`.
    key_rules: (the checkpoint's keys, the model's `variable_shapes`) -> the key rules.
    mesh: place every weight sharded on this mesh as it is read (no full copy per device).
    sharding_rules: logical -> mesh rule overrides (`sharding.resolve_rules`).

  Raises:
    hf.LoadError: missing or unexpected keys (listed), or a shape mismatch (named).
  """
  abstract = abstract_model(model_class, config)
  return hf.load_into(
    abstract,
    folder,
    key_rules(folder.keys(), variable_shapes(abstract)),
    mesh=mesh,
    sharding_rules=sharding.resolve_rules(sharding_rules) if mesh is not None else None,
    dtype=config.param_dtype,
  )
