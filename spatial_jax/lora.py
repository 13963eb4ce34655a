"""LoRA for `nnx.Linear` layers: alpha/rank scaling, regex targets, merge, PEFT adapter I/O.

Conventions (DESIGN.md §4, jax_style.md §4 "LoRA in NNX"):

- `apply_lora` wraps matched `nnx.Linear` layers in place with `LoRALinear`; the base layer object
  is kept (its kernel path gains a `.base`: `blocks.0.attn.to_q.base.kernel`).
- Adapters are `nnx.LoRAParam`s, so `nnx.split(model, trainable_filter, ...)` selects exactly them.
  `LoRAParam` subclasses `nnx.Param`, so a `nnx.Param` filter also matches adapters: put
  `nnx.LoRAParam` first, e.g. `nnx.split(model, nnx.LoRAParam, ...)`.
- Unlike `nnx.LoRA`, the update is scaled by alpha / rank as in PEFT and diffusers
  (jax_style.md §1 pitfall 6). LoRA dropout is not implemented (PEFT's default is 0).
- `disabled(model)` gives the LoRA-off view (the GRPO reference policy) without copying weights.
- `export_peft` / `import_peft` read and write PEFT `save_pretrained` folders; `name_map` translates
  our module paths to the Hugging Face module names (see `hf_name`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spatial_jax import sharding

# The filter that selects the trainable (adapter) parameters.
trainable_filter = nnx.LoRAParam

# The logical axis name of the rank dimension; sharding rules map it to no mesh axis.
LORA_AXIS = "lora"

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# A name map is a list of (our path template, HF module template) pairs; see `hf_name`.
NameMap = Sequence[tuple[str, str]]

# LoRA A starts as PEFT's kaiming_uniform_(a=sqrt(5)) on a (rank, in) weight, U(-1/sqrt(in),
# 1/sqrt(in)): on our (in, rank) layout that is variance_scaling(gain^2 = 2 / (1 + 5) = 1/3,
# fan_in = in), with any stacked-layer axes as batch axes.


class LoRALinear(nnx.Module):
  """An `nnx.Linear` plus a low-rank update: y = base(x) + (x @ A @ B) * (alpha / rank).

  Attributes:
    base: the wrapped `nnx.Linear` (the same object, not a copy).
    lora_a: (in, rank) `nnx.LoRAParam`, logical axes (base input axis, "lora"); with a leading
      layer axis when the base is a stack of scanned layers.
    lora_b: (rank, out) `nnx.LoRAParam`, zeros at init, logical axes ("lora", base output axis).
    rank, alpha: the LoRA rank and alpha; the update is scaled by alpha / rank.
    enabled: static switch; `disabled(model)` turns it off to get the base model's output.
  """

  def __init__(
    self,
    base: nnx.Linear,
    *,
    rank: int,
    alpha: float,
    rngs: nnx.Rngs,
    param_dtype: Any = jnp.float32,
  ):
    if rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {rank}.")
    self.base = base
    self.rank = rank
    self.alpha = alpha
    self.enabled = True
    kernel = base.kernel
    # A base inside a stack of scanned blocks has kernel (*layers, in, out): the adapters get the
    # same leading axes, and `nnx.scan` hands each step its own (in, rank) / (rank, out) slice.
    lead = tuple(kernel.shape[:-2])
    meta = kernel.get_metadata()
    names = meta.get("out_sharding")
    extra = {k: meta[k] for k in ("mesh", "sharding_rules") if meta.get(k) is not None}

    def annotate(init, axes):
      # Only annotate when the base is annotated: "lora" alone would not place anything.
      return nnx.with_partitioning(init, axes, **extra) if names else init

    *lead_axes, in_axis, out_axis = names if names else (None,) * (len(lead) + 2)
    a_init = nnx.initializers.variance_scaling(
      1.0 / 3.0, "fan_in", "uniform", batch_axis=tuple(range(len(lead)))
    )
    # Adapters are kept in fp32 even on a bf16 base (as PEFT does): at LoRA learning rates an
    # update is far below bf16's spacing near the adapters' values and would round away.
    # Create the adapters the way the base kernel was created: a model built with eager sharding
    # off (no mesh) must also get unsharded adapters, or creating them would need a mesh.
    with nnx.use_eager_sharding(meta.get("eager_sharding", nnx.using_eager_sharding())):
      self.lora_a = nnx.LoRAParam(
        annotate(a_init, (*lead_axes, in_axis, LORA_AXIS))(
          rngs.params(), (*lead, base.in_features, rank), param_dtype
        )
      )
      self.lora_b = nnx.LoRAParam(
        annotate(nnx.initializers.zeros, (*lead_axes, LORA_AXIS, out_axis))(
          rngs.params(), (*lead, rank, base.out_features), param_dtype
        )
      )
    self._place_like_base(kernel.get_value())

  def _place_like_base(self, kernel: Any) -> None:
    """Lays the adapters out like a concrete, mesh-sharded base kernel: A split as the kernel's
    input dimension, B as its output dimension, the rank replicated. (Annotations alone do not
    place them when the base was loaded shard by shard outside flax's eager sharding.)"""
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, NamedSharding) or isinstance(kernel, jax.core.Tracer):
      return
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    *lead, in_spec, out_spec = spec
    for param, layout in (
      (self.lora_a, (*lead, in_spec, None)),
      (self.lora_b, (*lead, None, out_spec)),
    ):
      param[...] = jax.device_put(param[...], NamedSharding(sharding.mesh, PartitionSpec(*layout)))

  @property
  def num_stacked(self) -> int | None:
    """The number of stacked layers this adapter spans, or None for a plain layer."""
    shape = self.lora_a.shape
    return None if len(shape) == 2 else shape[0]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
    y = self.base(x, **kwargs)
    if not self.enabled:
      return y
    # Same dtype policy as the base layer (its `dtype`, or inferred from inputs and params).
    x, a, b = self.base.promote_dtype(
      (x, self.lora_a[...], self.lora_b[...]), dtype=self.base.dtype
    )
    precision = self.base.precision
    # Tokens as one matrix dimension: the adapters' gradients then contract a single axis,
    # which XLA's CPU backend runs about 2x faster than a (batch, seq) contraction.
    rows = x.reshape(-1, x.shape[-1])
    update = jnp.matmul(jnp.matmul(rows, a, precision=precision), b, precision=precision)
    return y + (update.reshape(*x.shape[:-1], -1) * self.scale).astype(y.dtype)


def _path_str(path: Sequence[Any]) -> str:
  return ".".join(str(p) for p in path)


def _child(node: Any, key: Any) -> Any:
  return node[key] if isinstance(key, int) or isinstance(node, Mapping) else getattr(node, key)


def _set_child(root: Any, path: Sequence[Any], value: Any) -> None:
  parent = root
  for key in path[:-1]:
    parent = _child(parent, key)
  if isinstance(path[-1], int) or isinstance(parent, Mapping):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
  """Returns every `LoRALinear` of `model` by its dotted path, in traversal order."""
  return {_path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)}


def apply_lora(
  model: nnx.Module, *, rank: int, alpha: float, targets: Sequence[str], rngs: nnx.Rngs
) -> list[str]:
  """Wraps, in place, every `nnx.Linear` whose dotted path fully matches a target regex.

  Args:
    model: the model to modify in place.
    rank: LoRA rank r.
    alpha: LoRA alpha; the update is scaled by alpha / rank.
    targets: regexes matched with `re.fullmatch` against paths such as `blocks.0.attn.to_q`.
    rngs: `rngs.params()` draws the A initialisations.

  Returns:
    The matched paths, in traversal order.

  Raises:
    ValueError: a pattern matched no `nnx.Linear`, or matched a layer that already has LoRA.
  """
  if isinstance(targets, str):
    targets = [targets]  # A bare string would otherwise be read as one pattern per character.
  if not targets:
    raise ValueError("apply_lora needs at least one target pattern.")
  patterns = [re.compile(t) for t in targets]
  wrapped = lora_layers(model)
  if redone := [p for p in wrapped if any(r.fullmatch(p) for r in patterns)]:
    raise ValueError(f"LoRA is already applied to {redone}; apply it once.")
  base_ids = {id(m.base) for m in wrapped.values()}
  linears = [
    (path, m)
    for path, m in nnx.iter_modules(model)
    if path and isinstance(m, nnx.Linear) and id(m) not in base_ids
  ]
  names = [_path_str(p) for p, _ in linears]
  if unused := [r.pattern for r in patterns if not any(r.fullmatch(n) for n in names)]:
    raise ValueError(
      f"LoRA target pattern(s) {unused} matched no nnx.Linear (re.fullmatch on dotted paths). "
      f"Available linear paths (first 20 of {len(names)}): {names[:20]}"
    )
  matched = []
  for (path, linear), name in zip(linears, names, strict=True):
    if any(r.fullmatch(name) for r in patterns):
      _set_child(model, path, LoRALinear(linear, rank=rank, alpha=alpha, rngs=rngs))
      matched.append(name)
  logging.info("LoRA rank=%d alpha=%s on %d linear layers: %s", rank, alpha, len(matched), matched)
  return matched


@contextlib.contextmanager
def disabled(model: nnx.Module) -> Iterator[nnx.Module]:
  """Turns every LoRA layer of `model` off inside the block (the base model's outputs).

  No weights are copied: the switch is a static Python attribute, so it also works while tracing
  a jitted function (on a merged, passed or captured model) and is restored afterwards.
  """
  layers = list(lora_layers(model).values())
  previous = [layer.enabled for layer in layers]

  def set_enabled(layer: LoRALinear, value: bool) -> None:
    # NNX refuses to mutate a module created outside the current trace (e.g. one captured by a
    # jitted closure). A static bool that we restore cannot leak a tracer, so skip that check.
    object.__setattr__(layer, "enabled", value)

  for layer in layers:
    set_enabled(layer, False)
  try:
    yield model
  finally:
    for layer, value in zip(layers, previous, strict=True):
      set_enabled(layer, value)


def merge(model: nnx.Module) -> nnx.Module:
  """Folds (alpha / rank) * A @ B into each base kernel and puts the base Linear back in place.

  Mutates `model` (and the base kernels) and returns it; if `model` itself is a `LoRALinear`,
  returns its merged base. The fold is computed in float32, then cast to the kernel dtype.
  """
  if isinstance(model, LoRALinear):
    _fold(model)
    return model.base
  for path, layer in [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]:
    _fold(layer)
    _set_child(model, path, layer.base)
  return model


def _fold(layer: LoRALinear) -> None:
  kernel = layer.base.kernel
  a = layer.lora_a[...].astype(jnp.float32)
  b = layer.lora_b[...].astype(jnp.float32)
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * layer.scale
  kernel[...] = (kernel[...].astype(jnp.float32) + delta).astype(kernel.dtype)


# ------------------------------------------------------------------------------------------------
# PEFT adapter I/O.
# ------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _template_regex(template: str) -> re.Pattern[str]:
  parts = _PLACEHOLDER.split(template)  # Alternates literal text and placeholder names.
  return re.compile(
    "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^.]+)" for i, p in enumerate(parts))
  )


# In a name map's HF template, `{layer}` stands for the layer index of a stacked (scanned) module:
# our one path `blocks.attn.to_q` with adapters (L, in, r) is L HF modules `blocks.{0..L-1}.attn.to_q`.
LAYER = "layer"


def hf_name(path: str, name_map: NameMap | None) -> str:
  """Translates our dotted module path to the Hugging Face module name.

  `name_map` is a list of (ours, theirs) templates, tried in order; the first whose `ours` fully
  matches `path` wins. `{name}` placeholders match one path segment (no dots) and are copied into
  `theirs`, e.g. `("blocks.{i}.attn.{proj}", "transformer_blocks.{i}.attn.{proj}")` or
  `("head", "proj_out")`. `theirs` may also hold `{layer}` (see `LAYER`), which is left in the
  result for the caller to fill. `None` means the names are the same.

  Raises:
    ValueError: no template matches `path`, or a template uses a placeholder the other lacks.
  """
  if name_map is None:
    return path
  for ours, theirs in name_map:
    if set(_PLACEHOLDER.findall(ours)) != set(_PLACEHOLDER.findall(theirs)) - {LAYER}:
      raise ValueError(f"name_map entry {(ours, theirs)} uses different placeholders per side.")
    if m := _template_regex(ours).fullmatch(path):
      return theirs.format(**m.groupdict(), **{LAYER: "{" + LAYER + "}"})
  raise ValueError(f"No name_map entry matches module path {path!r}; name_map: {list(name_map)}")


class _Entry(NamedTuple):
  path: str  # Our module path.
  layer: LoRALinear
  index: int | None  # The slice of a stacked layer, or None.


def _hf_names(model: nnx.Module, name_map: NameMap | None) -> dict[str, _Entry]:
  """HF module name -> our (path, layer, stacked index) for every LoRA layer, one-to-one."""
  layers = lora_layers(model)
  if not layers:
    raise ValueError("The model has no LoRA layers; call lora.apply_lora first.")
  out: dict[str, _Entry] = {}
  for path, layer in layers.items():
    name = hf_name(path, name_map)
    stacked = layer.num_stacked
    if (stacked is None) != ("{" + LAYER + "}" not in name):
      raise ValueError(
        f"{path!r} maps to {name!r}: a stacked layer needs a {{{LAYER}}} in its HF name and "
        "a plain layer must not have one."
      )
    entries = (
      [(name, _Entry(path, layer, None))]
      if stacked is None
      else [(name.format(**{LAYER: i}), _Entry(path, layer, i)) for i in range(stacked)]
    )
    for hf, entry in entries:
      if hf in out:
        raise ValueError(f"name_map sends both {out[hf].path!r} and {path!r} to {hf!r}.")
      out[hf] = entry
  return out


def _shared_rank_alpha(layers: Sequence[LoRALinear]) -> tuple[int, float]:
  settings = {(layer.rank, layer.alpha) for layer in layers}
  if len(settings) > 1:
    # PEFT would need rank_pattern / alpha_pattern; no model here uses mixed ranks.
    raise ValueError(f"LoRA layers use several (rank, alpha) settings {sorted(settings)}.")
  return settings.pop()


def _peft_config(rank: int, alpha: float, names: Sequence[str], base: str | None) -> dict:
  return {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": base,
    "r": rank,
    "lora_alpha": alpha,
    "target_modules": "|".join(re.escape(n) for n in sorted(names)),
    "lora_dropout": 0.0,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "inference_mode": True,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
  }


# diffusers keeps the adapter's LoraConfig in the safetensors header under this key, each field
# prefixed with the component (`transformer.r`), instead of an adapter_config.json.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


def export_peft(
  model: nnx.Module,
  directory: str | os.PathLike[str],
  *,
  name_map: NameMap | None = None,
  base_model_name_or_path: str | None = None,
  key_prefix: str = "base_model.model.",
  weights_name: str = WEIGHTS_NAME,
  diffusers_component: str | None = None,
) -> None:
  """Writes the adapters as a PEFT folder (`adapter_config.json` + safetensors).

  Keys are `<key_prefix><hf module>.lora_A.weight` (rank, in) and `.lora_B.weight` (out, rank),
  i.e. PyTorch layout (our matrices transposed), in the adapters' dtype; a stacked layer is
  written as one module per layer (`{layer}` in `name_map`). `target_modules` is written as an
  exact-name regex: PEFT reads a list as suffixes, which would also hit e.g.
  `single_transformer_blocks.0.proj_out` when only the top-level `proj_out` was adapted.

  `diffusers_component="transformer"` writes diffusers' format instead: keys prefixed with
  `transformer.`, `pytorch_lora_weights.safetensors` by default, and the LoRA config (rank and
  alpha included) in the file's `lora_adapter_metadata` header, which
  `FluxPipeline.load_lora_weights` reads. When adapters span several processes, call this on
  every process; process 0 writes.
  """
  entries = _hf_names(model, name_map)
  rank, alpha = _shared_rank_alpha([e.layer for e in entries.values()])
  if diffusers_component:
    key_prefix = f"{diffusers_component}."
    if weights_name == WEIGHTS_NAME:
      weights_name = DIFFUSERS_WEIGHTS_NAME
  tensors = {}
  gathered: dict[int, tuple[np.ndarray, np.ndarray]] = {}
  for name, (_, layer, index) in entries.items():
    if id(layer) not in gathered:
      gathered[id(layer)] = (
        sharding.to_host(layer.lora_a[...]),
        sharding.to_host(layer.lora_b[...]),
      )
    a, b = gathered[id(layer)]
    if index is not None:
      a, b = a[index], b[index]
    tensors[f"{key_prefix}{name}.lora_A.weight"] = a.T.copy()
    tensors[f"{key_prefix}{name}.lora_B.weight"] = b.T.copy()
  config = _peft_config(rank, alpha, list(entries), base_model_name_or_path)
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  metadata = {"format": "pt"}
  if diffusers_component:
    packed = {f"{diffusers_component}.{k}": v for k, v in config.items()}
    metadata[DIFFUSERS_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
  safetensors.numpy.save_file(tensors, os.path.join(directory, weights_name), metadata=metadata)
  if not diffusers_component:
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
  logging.info("Wrote LoRA adapter (%d modules, r=%d) to %s", len(entries), rank, directory)


DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

# Config values we do not implement; importing such an adapter would silently change outputs.
_UNSUPPORTED = (
  "use_dora",
  "use_rslora",
  "fan_in_fan_out",
  "lora_bias",
  "rank_pattern",
  "alpha_pattern",
  "modules_to_save",
)


@contextlib.contextmanager
def _readable(weights_path: str) -> Iterator[None]:
  """Turns safetensors' errors on a damaged file (truncated, overwritten) into one naming it."""
  try:
    yield
  except safetensors.SafetensorError as e:
    raise ValueError(
      f"{weights_path} is not a readable safetensors file ({e}): the adapter is damaged."
    ) from e


def read_adapter_config(
  directory: str | os.PathLike[str],
  *,
  weights_name: str = WEIGHTS_NAME,
  diffusers_component: str | None = None,
) -> tuple[dict[str, Any], str, str]:
  """(config, weights path, where the config came from) for an adapter.

  The LoRA config is PEFT's `adapter_config.json`, or for a diffusers file its
  `lora_adapter_metadata` header (without one, diffusers takes alpha = rank; so do we, with the
  rank read from the first lora_A shape).

  Raises:
    ValueError: a missing file, a config we do not support (DoRA, rsLoRA, per-module ranks...).
  """
  if diffusers_component and weights_name == WEIGHTS_NAME:
    weights_name = DIFFUSERS_WEIGHTS_NAME
  weights_path = os.path.join(directory, weights_name)
  if not os.path.exists(weights_path):
    raise ValueError(f"LoRA adapter file not found: {weights_path}")
  config_path = os.path.join(directory, CONFIG_NAME)
  if not diffusers_component:
    if not os.path.exists(config_path):
      raise ValueError(f"PEFT adapter file not found: {config_path}")
    with open(config_path) as f:
      config = json.load(f)
  else:
    config_path = f"{weights_path} ({DIFFUSERS_METADATA_KEY})"
    with _readable(weights_path), safetensors.safe_open(weights_path, "numpy") as f:
      header = f.metadata() or {}
      first_a = next((k for k in f.keys() if k.endswith(".lora_A.weight")), None)
      rank = f.get_slice(first_a).get_shape()[0] if first_a else None
    prefix = f"{diffusers_component}."
    packed = json.loads(header.get(DIFFUSERS_METADATA_KEY) or "{}")
    config = {k[len(prefix) :]: v for k, v in packed.items() if k.startswith(prefix)}
    config.setdefault("r", rank)
    config.setdefault("lora_alpha", config["r"])
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{config_path}: peft_type is {config['peft_type']!r}, expected 'LORA'.")
  for field in _UNSUPPORTED:
    if config.get(field):  # Each is off when falsy (False, None, {}, []).
      raise ValueError(f"{config_path}: {field}={config[field]!r} is not supported.")
  return config, weights_path, config_path


def import_peft(
  model: nnx.Module,
  directory: str | os.PathLike[str],
  *,
  name_map: NameMap | None = None,
  key_prefix: str = "base_model.model.",
  weights_name: str = WEIGHTS_NAME,
  diffusers_component: str | None = None,
) -> None:
  """Loads a PEFT LoRA folder (or, with `diffusers_component`, a diffusers LoRA file) into a
  model that already has LoRA applied (`apply_lora`).

  LoRA must be applied first, with the adapter's targets, rank and alpha: that keeps sharding and
  target choices with the caller, and makes the check exact. The file's keys must be exactly
  those of the model's LoRA layers (through `name_map`, after `key_prefix`; every layer of a
  stacked module); values keep each adapter's dtype and sharding.

  Raises:
    ValueError: naming the file, for a config we do not support (DoRA, rsLoRA, per-module ranks,
      ...), a rank/alpha mismatch, missing or unexpected keys, or shape mismatches.
  """
  config, weights_path, config_path = read_adapter_config(
    directory, weights_name=weights_name, diffusers_component=diffusers_component
  )
  if diffusers_component:
    key_prefix = f"{diffusers_component}."
  entries = _hf_names(model, name_map)
  rank, alpha = _shared_rank_alpha([e.layer for e in entries.values()])
  if (config.get("r"), config.get("lora_alpha")) != (rank, alpha):
    raise ValueError(
      f"{config_path}: r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, but the "
      f"model's LoRA layers use rank={rank}, alpha={alpha}."
    )

  with _readable(weights_path):
    tensors = safetensors.numpy.load_file(weights_path)
  expected = {}
  for name, (_, layer, index) in entries.items():
    expected[f"{key_prefix}{name}.lora_A.weight"] = (
      layer.lora_a,
      index,
      (rank, layer.base.in_features),
    )
    expected[f"{key_prefix}{name}.lora_B.weight"] = (
      layer.lora_b,
      index,
      (layer.base.out_features, rank),
    )
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  bad_shapes = [
    f"{k}: file {tensors[k].shape}, model {shape}"
    for k, (_, _, shape) in expected.items()
    if k in tensors and tensors[k].shape != shape
  ]
  if missing or unexpected or bad_shapes:
    raise ValueError(
      f"{weights_path} does not fit the model's LoRA layers:\n"
      f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  shape mismatches: {bad_shapes}"
    )
  # Gather every slice of a parameter first, then place it once with its sharding.
  values: dict[int, tuple[nnx.Variable, np.ndarray]] = {}
  for key, (param, index, _) in expected.items():
    if id(param) not in values:
      values[id(param)] = (param, sharding.to_host(param[...]).copy())
    host = values[id(param)][1]
    if index is None:
      host[...] = tensors[key].T
    else:
      host[index] = tensors[key].T
  for param, host in values.values():
    old = param[...]
    param[...] = jax.device_put(host.astype(old.dtype), old.sharding)
  logging.info("Loaded LoRA adapter (%d modules, r=%d) from %s", len(entries), rank, directory)
