"""FLUX checkpoints -> `FluxTransformer`: diffusers folders, the BFL single file, LoRA files.

Our module tree carries diffusers' names, so a diffusers key maps mechanically: `X.weight` of a
Linear is our transposed `X.kernel`, everything else keeps its name; with scanned layers
`transformer_blocks.N.rest` fills slice N of the stacked `transformer_blocks.rest`. The BFL
single file (`flux1-dev.safetensors`) is read through `BFLCheckpoint`, a view that presents it
under diffusers' names with diffusers' own conversion (flux.md §3: fused qkv and `linear1` split
at D / 2D / 3D, `norm_out` halves swapped).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from spatial_jax import fileio, hf, lora, sharding
from spatial_jax.models import common
from spatial_jax.models.flux.config import FluxConfig
from spatial_jax.models.flux.model import FluxTransformer

_T = hf.transpose()
_BLOCKS = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)")

# --- diffusers <-> BFL names ----------------------------------------------------------------------
# (BFL module, diffusers modules, how): "copy" one-to-one; "split" the BFL rows into the listed
# diffusers modules (equal parts, or D, D, D, rest for `linear1`); "swap" exchanges the two
# halves. `{n}` is a block index. Norm scales are `.scale` in BFL, `.weight` in diffusers.
_DOUBLE = (
  ("img_mod.lin", ("norm1.linear",), "copy"),
  ("txt_mod.lin", ("norm1_context.linear",), "copy"),
  ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), "split"),
  ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "split"),
  ("img_attn.norm.query_norm", ("attn.norm_q",), "copy"),
  ("img_attn.norm.key_norm", ("attn.norm_k",), "copy"),
  ("txt_attn.norm.query_norm", ("attn.norm_added_q",), "copy"),
  ("txt_attn.norm.key_norm", ("attn.norm_added_k",), "copy"),
  ("img_attn.proj", ("attn.to_out.0",), "copy"),
  ("txt_attn.proj", ("attn.to_add_out",), "copy"),
  ("img_mlp.0", ("ff.net.0.proj",), "copy"),
  ("img_mlp.2", ("ff.net.2",), "copy"),
  ("txt_mlp.0", ("ff_context.net.0.proj",), "copy"),
  ("txt_mlp.2", ("ff_context.net.2",), "copy"),
)
_SINGLE = (
  ("modulation.lin", ("norm.linear",), "copy"),
  ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "split"),
  ("norm.query_norm", ("attn.norm_q",), "copy"),
  ("norm.key_norm", ("attn.norm_k",), "copy"),
  ("linear2", ("proj_out",), "copy"),
)
_TOP = (
  ("img_in", ("x_embedder",), "copy"),
  ("txt_in", ("context_embedder",), "copy"),
  ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), "copy"),
  ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), "copy"),
  ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), "copy"),
  ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), "copy"),
  ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), "copy"),
  ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), "copy"),
  ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
  ("final_layer.linear", ("proj_out",), "copy"),
)
_SUFFIXES = {"weight": "weight", "bias": "bias", "scale": "weight"}


def _bfl_modules(num_double: int, num_single: int):
  """(BFL module, diffusers modules, how) for every module of a model of this depth."""
  yield from _TOP
  for n in range(num_double):
    for bfl, ours, how in _DOUBLE:
      yield f"double_blocks.{n}.{bfl}", tuple(f"transformer_blocks.{n}.{o}" for o in ours), how
  for n in range(num_single):
    for bfl, ours, how in _SINGLE:
      yield (
        f"single_blocks.{n}.{bfl}",
        tuple(f"single_transformer_blocks.{n}.{o}" for o in ours),
        how,
      )


def _split_sizes(total: int, parts: int, dim: int) -> list[int]:
  # `linear1` is [q; k; v; mlp]: D, D, D, then the MLP rows; qkv is three equal parts.
  return [dim, dim, dim, total - 3 * dim] if parts == 4 else [total // parts] * parts


def _depth(keys: Iterable[str], pattern: str) -> int:
  found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
  return max(found) + 1 if found else 0


class BFLCheckpoint:
  """A BFL single-file FLUX checkpoint read under diffusers' key names (lazily, per tensor).

  Quacks like `hf.SafetensorsFolder` (`keys`, `read`, `path`), so `hf.load_into` and the
  diffusers key rules load it unchanged.
  """

  def __init__(self, path: str | os.PathLike):
    self.file = hf.SafetensorsFolder(path)
    self.path = self.file.path
    keys = set(self.file.keys())
    if "img_in.weight" not in keys:
      raise hf.LoadError(f"{path}: not a BFL FLUX checkpoint (no `img_in.weight`)")
    self.dim = self.file.info("img_in.weight").shape[0]
    double = _depth(keys, r"double_blocks\.(\d+)\.")
    single = _depth(keys, r"single_blocks\.(\d+)\.")
    self._readers: dict[str, Callable[[], np.ndarray]] = {}
    self._unused = set(keys)
    for bfl, ours, how in _bfl_modules(double, single):
      for bfl_suffix, suffix in _SUFFIXES.items():
        key = f"{bfl}.{bfl_suffix}"
        if key not in keys:
          continue
        self._unused.discard(key)
        for i, name in enumerate(ours):
          self._readers[f"{name}.{suffix}"] = self._reader(key, how, i, len(ours))
    # Keys we do not know stay visible under their own names: load_into reports them.
    for key in self._unused:
      self._readers[key] = lambda key=key: self.file.read(key)

  def _reader(self, key: str, how: str, part: int, parts: int) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
      x = self.file.read(key)
      if how == "swap":
        return np.concatenate(np.split(x, 2, axis=0)[::-1], axis=0)
      if how == "split":
        bounds = np.cumsum(_split_sizes(x.shape[0], parts, self.dim))[:-1]
        return np.split(x, bounds, axis=0)[part]
      return x

    return read

  def keys(self) -> list[str]:
    return sorted(self._readers)

  def __contains__(self, key: object) -> bool:
    return key in self._readers

  def read(self, key: str) -> np.ndarray:
    return self._readers[key]()


def to_bfl(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A diffusers FLUX state dict (numpy) -> the BFL single-file layout (fusing, swapping)."""
  keys = set(state_dict)
  double = _depth(keys, r"transformer_blocks\.(\d+)\.")
  single = _depth(keys, r"single_transformer_blocks\.(\d+)\.")
  out, used = {}, set()
  for bfl, ours, how in _bfl_modules(double, single):
    for bfl_suffix, suffix in _SUFFIXES.items():
      names = [f"{o}.{suffix}" for o in ours]
      if not all(n in state_dict for n in names):
        continue
      used.update(names)
      parts = [np.asarray(state_dict[n]) for n in names]
      if how == "swap":
        parts = np.split(parts[0], 2, axis=0)[::-1]
      out[f"{bfl}.{bfl_suffix}"] = np.concatenate(parts, axis=0)
  if leftover := sorted(keys - used):
    raise ValueError(f"No BFL name for diffusers keys: {leftover[:10]}")
  return out


# --- diffusers keys -> our paths ------------------------------------------------------------------


def hf_key_to_path(
  key: str, our_paths: Collection[str], our_modules: set[str]
) -> tuple[str, hf.Transform | None]:
  """Our variable path (`[n]` for slice n of a stacked layer) and transform for a diffusers key.

  `our_modules` are the model's module paths (its variable paths without the last segment).
  """
  stem, _, leaf = key.rpartition(".")
  index = ""
  if (m := _BLOCKS.fullmatch(stem)) and f"{m[1]}.{m[3]}" in our_modules:
    stem, index = f"{m[1]}.{m[3]}", f"[{m[2]}]"  # A scanned model's stacked module.
  transform = None
  if leaf == "weight" and f"{stem}.kernel" in our_paths:
    leaf, transform = "kernel", _T
  return f"{stem}.{leaf}{index}", transform


def key_rules(keys: Iterable[str], our_paths: Collection[str]) -> list[hf.KeyRule]:
  """One exact rule per checkpoint key."""
  modules = {p.rpartition(".")[0] for p in our_paths}
  return [hf.KeyRule(re.escape(k), *hf_key_to_path(k, our_paths, modules)) for k in keys]


def _is_bfl(path: str) -> bool:
  return os.path.isfile(path) and path.endswith(".safetensors")


def from_pretrained(
  local_dir: str | os.PathLike,
  *,
  config: FluxConfig | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  sharding_rules: Any = None,
  **runtime: Any,
) -> FluxTransformer:
  """Reads a diffusers `transformer/` folder (config.json + safetensors, sharded index too) or a
  BFL single file (`flux1-dev.safetensors`) into `FluxTransformer`.

  Args:
    local_dir: the folder, or the BFL `.safetensors` file.
    config: the architecture for a BFL file, which has no config (default: FLUX.1-dev, or
      schnell when the file has no guidance embedder); ignored for a folder.
    dtype: compute dtype; param_dtype: parameter dtype (default: dtype).
    mesh: place every weight sharded on this mesh as it is read (no full copy per device).
    sharding_rules: logical -> mesh rule overrides (`sharding.resolve_rules`).
    **runtime: other runtime fields of `FluxConfig` (`scan_layers`, `remat`, `attention_impl`).

  Raises:
    hf.LoadError: missing or unexpected keys (listed), or a shape mismatch (named).
  """
  local_dir = os.fspath(local_dir)
  runtime = dict(dtype=dtype, param_dtype=param_dtype or dtype, **runtime)
  if _is_bfl(local_dir):
    folder = BFLCheckpoint(local_dir)
    if config is None:
      guided = "time_text_embed.guidance_embedder.linear_1.weight" in folder
      config = FluxConfig.flux1_dev() if guided else FluxConfig.flux1_schnell()
    config = config.replace(**runtime)
  else:
    folder = hf.SafetensorsFolder(local_dir)
    config = FluxConfig.from_hf_config(hf.read_config(local_dir), **runtime)
  return common.load_pretrained(
    FluxTransformer, config, folder, key_rules, mesh=mesh, sharding_rules=sharding_rules
  )


# --- LoRA ------------------------------------------------------------------------------------------

_LAYER = r"(\.\d+)?"  # Present per block without scan_layers, absent on a stacked module.
# diffusers' FLUX LoRA training and Flow-GRPO target these module names (PEFT suffix matching,
# so single blocks' attn.to_q/k/v are included): attention of both streams + both FFNs.
DEFAULT_LORA_TARGETS = (
  rf"(single_)?transformer_blocks{_LAYER}\.attn\.(to_q|to_k|to_v)",
  rf"transformer_blocks{_LAYER}\.attn\.(to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
  rf"transformer_blocks{_LAYER}\.(ff|ff_context)\.net\.(0\.proj|2)",
)
# The optional single-block MLP projections.
SINGLE_MLP_LORA_TARGETS = (rf"single_transformer_blocks{_LAYER}\.(proj_mlp|proj_out)",)
DEFAULT_LORA_RANK = 32
DEFAULT_LORA_ALPHA = 64.0
DIFFUSERS_COMPONENT = "transformer"


def lora_targets(single_mlp: bool = False) -> tuple[str, ...]:
  return DEFAULT_LORA_TARGETS + (SINGLE_MLP_LORA_TARGETS if single_mlp else ())


def lora_name_map(config: FluxConfig) -> lora.NameMap | None:
  """Our LoRA module paths -> diffusers module names (`{layer}` expands a stacked module)."""
  if not config.scan_layers:
    return None  # Same names.
  entries = []
  for blocks in ("transformer_blocks", "single_transformer_blocks"):
    for depth in range(1, 5):
      rest = ".".join(f"{{p{i}}}" for i in range(depth))
      entries.append((f"{blocks}.{rest}", f"{blocks}.{{{lora.LAYER}}}.{rest}"))
  for depth in range(1, 5):  # Everything else keeps its name.
    rest = ".".join(f"{{p{i}}}" for i in range(depth))
    entries.append((rest, rest))
  return tuple(entries)


def export_lora(model: FluxTransformer, directory: str | os.PathLike, **kwargs: Any) -> None:
  """Writes the adapters as a diffusers FLUX LoRA (`pytorch_lora_weights.safetensors`, keys
  `transformer.<module>.lora_A.weight`, rank/alpha in the header): `FluxPipeline.load_lora_weights`
  reads it."""
  lora.export_peft(
    model,
    directory,
    name_map=lora_name_map(model.config),
    diffusers_component=DIFFUSERS_COMPONENT,
    **kwargs,
  )


def load_lora(
  model: FluxTransformer, directory: str | os.PathLike, *, rngs: nnx.Rngs | None = None
) -> list[str]:
  """Applies and loads a diffusers/peft FLUX LoRA folder (`pytorch_lora_weights.safetensors`).

  LoRA is applied to exactly the modules the file holds, with its rank and alpha (from the
  header; diffusers' alpha = rank without one). With scan_layers, a module kind must be adapted
  in every layer of its stack. Returns our adapted module paths.
  """
  config, weights_path, _ = lora.read_adapter_config(
    directory, diffusers_component=DIFFUSERS_COMPONENT
  )
  prefix = f"{DIFFUSERS_COMPONENT}."
  modules = sorted(
    {
      k[len(prefix) : -len(".lora_A.weight")]
      for k in hf.SafetensorsFolder(weights_path).keys()
      if k.startswith(prefix) and k.endswith(".lora_A.weight")
    }
  )
  if not modules:
    raise ValueError(f"{weights_path}: no `{prefix}*.lora_A.weight` keys")
  ours = sorted({_BLOCKS.sub(r"\1.\3", m) if model.config.scan_layers else m for m in modules})
  lora.apply_lora(
    model,
    rank=int(config["r"]),
    alpha=float(config["lora_alpha"]),
    targets=[re.escape(p) for p in ours],
    rngs=rngs or nnx.Rngs(0),
  )
  lora.import_peft(
    model, directory, name_map=lora_name_map(model.config), diffusers_component=DIFFUSERS_COMPONENT
  )
  return ours


# --- Writing a diffusers folder -------------------------------------------------------------------


def to_diffusers_state(model: FluxTransformer) -> dict[str, np.ndarray]:
  """The model's weights under diffusers' `FluxTransformer2DModel` keys, in PyTorch layout.

  The inverse of `hf_key_to_path`: a kernel is written transposed as `weight`, a stacked
  (scanned) module as one key per layer. Gathers sharded arrays to the host; with several
  processes every process must call it.

  Raises:
    ValueError: the model has LoRA layers (fold them in with `lora.merge` first, or write the
      adapter alone with `export_lora`).
  """
  if adapted := lora.lora_layers(model):
    raise ValueError(
      f"The model has LoRA layers ({sorted(adapted)[:3]}...): lora.merge(model) before writing "
      "a diffusers folder, or export_lora for the adapter alone."
    )
  out: dict[str, np.ndarray] = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = [str(p) for p in path]
    value = sharding.to_host(variable[...])
    if names[-1] == "kernel":
      names[-1], value = "weight", np.swapaxes(value, -1, -2)
    if model.config.scan_layers and names[0] in ("transformer_blocks", "single_transformer_blocks"):
      for i, layer in enumerate(value):
        out[".".join([names[0], str(i), *names[1:]])] = np.ascontiguousarray(layer)
    else:
      out[".".join(names)] = np.ascontiguousarray(value)
  return out


def save_pretrained(model: FluxTransformer, directory: str | os.PathLike) -> None:
  """Writes a diffusers `transformer/` folder (`config.json` + one safetensors file) that
  `from_pretrained` and diffusers' `FluxTransformer2DModel.from_pretrained` read.

  Weights keep their dtype. Every process must call it (sharded weights are gathered);
  process 0 writes.
  """
  if model.config.mlp_ratio != 4.0:
    raise ValueError(
      f"FluxConfig.mlp_ratio={model.config.mlp_ratio}: diffusers' FluxTransformer2DModel has no "
      "such field (its MLPs are 4x wide), so this model cannot be written as a diffusers folder."
    )
  tensors = to_diffusers_state(model)
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  hf.save_safetensors(
    tensors, os.path.join(directory, "diffusion_pytorch_model.safetensors"), {"format": "pt"}
  )
  config = json.dumps(model.config.to_hf_config(), indent=2, sort_keys=True) + "\n"
  fileio.write_atomic(os.path.join(directory, "config.json"), config.encode())
