"""Reading Hugging Face / diffusers safetensors folders into NNX models.

Every model port's `from_pretrained` is three steps:

  1. `SafetensorsFolder(path)`: the checkpoint's keys, shapes and dtypes, read
     from the file headers only (a single file or a sharded `*.index.json`).
  2. A regex table of `KeyRule`s (a family's `params.py`, as in tunix): HF key
     -> our dotted nnx path, with a numpy transform (transpose, reshape).
  3. `load_into(abstract_model, folder, rules, mesh=...)`: reads one tensor at a
     time and places it straight into its NamedSharding, so no host or device
     ever holds the whole checkpoint.

Steps 1 and 3 (with the abstract model) are `spatial_jax.models.common.load_pretrained`.

Tensors are read through `np.memmap` of the raw safetensors bytes rather than
`safetensors.safe_open`: the "numpy" framework cannot hold bfloat16, and the
"flax"/"jax" frameworks put every tensor whole on the default device. A memmap
view costs nothing until sliced, and a transpose or reshape of it is still a
view, so under a mesh each process reads from disk only the bytes of its
addressable shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from spatial_jax import fileio
from spatial_jax import sharding as sharding_lib

PathLike = str | os.PathLike[str]
Transform = Callable[[np.ndarray], np.ndarray]

# Weight files tried in a folder, in order: sharded indexes first, since a folder
# that has one may also hold a stale single file.
WEIGHTS_NAMES = (
  "model.safetensors.index.json",
  "diffusion_pytorch_model.safetensors.index.json",
  "model.safetensors",
  "diffusion_pytorch_model.safetensors",
)

# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec).
_DTYPES: dict[str, np.dtype] = {
  "BOOL": np.dtype(np.bool_),
  "U8": np.dtype(np.uint8),
  "I8": np.dtype(np.int8),
  "U16": np.dtype("<u2"),
  "I16": np.dtype("<i2"),
  "U32": np.dtype("<u4"),
  "I32": np.dtype("<i4"),
  "U64": np.dtype("<u8"),
  "I64": np.dtype("<i8"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F32": np.dtype("<f4"),
  "F64": np.dtype("<f8"),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_LISTED = 20


class TensorInfo(NamedTuple):
  """What a checkpoint says about one tensor, without reading it."""

  shape: tuple[int, ...]
  dtype: np.dtype
  file: str


class _File:
  """One .safetensors file: its parsed header and a lazily opened memmap."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise ValueError(f"{path} is not a safetensors file (only {size} bytes).")
      (header_len,) = struct.unpack("<Q", raw)
      if header_len > size - 8:
        raise ValueError(f"{path} is not a safetensors file (header length {header_len}).")
      try:
        header = json.loads(f.read(header_len))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file: bad header ({e}).") from e
    self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
    self._start = 8 + header_len
    self._memmap: np.memmap | None = None
    self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for key, entry in header.items():
      code = entry["dtype"]
      if code not in _DTYPES:
        raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {code!r}.")
      dtype, shape = _DTYPES[code], tuple(entry["shape"])
      begin, end = entry["data_offsets"]
      if end - begin != dtype.itemsize * int(np.prod(shape)) or self._start + end > size:
        raise ValueError(f"{path}: tensor {key!r} has bad offsets {entry['data_offsets']}.")
      self.entries[key] = (dtype, shape, begin, end)

  def read(self, key: str) -> np.ndarray:
    if self._memmap is None:
      self._memmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    dtype, shape, begin, end = self.entries[key]
    buffer = self._memmap[self._start + begin : self._start + end]
    return buffer.view(dtype).reshape(shape)


class SafetensorsFolder:
  """The tensors of a Hugging Face / diffusers checkpoint, listed from headers only.

  `path` is a folder (holding `model.safetensors`, `diffusion_pytorch_model.safetensors`,
  or a sharded `*.safetensors.index.json` with its shards), a `.safetensors` file, or an
  `.index.json` file. A diffusers pipeline root is not a checkpoint: pass its component
  folder (e.g. `FLUX.1-dev/transformer`).

  Attributes:
    path: the folder or file given.
    files: the .safetensors files, in index order.
    metadata: the first file's `__metadata__` (e.g. {"format": "pt"}).
  """

  def __init__(self, path: PathLike):
    self.path = os.fspath(path)
    weights = _find_weights(self.path)
    self._files: dict[str, _File] = {}
    self._where: dict[str, str] = {}
    if weights.endswith(".json"):
      self._open_index(weights)
    else:
      file = self._file(weights)
      self._where = dict.fromkeys(file.entries, weights)
    self.files = list(self._files)
    self.metadata = self._files[self.files[0]].metadata if self.files else {}

  def _file(self, path: str) -> _File:
    if path not in self._files:
      self._files[path] = _File(path)
    return self._files[path]

  def _open_index(self, index_path: str) -> None:
    index = _read_json(index_path, "sharded checkpoint index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index_path} has no 'weight_map' object.")
    base = os.path.dirname(index_path)
    shards = {name: os.path.join(base, name) for name in dict.fromkeys(weight_map.values())}
    absent = [name for name, path in shards.items() if not os.path.isfile(path)]
    if absent:
      raise FileNotFoundError(
        f"{index_path} names {len(absent)} shard file(s) that are not in {base}: {absent}."
      )
    for key, name in weight_map.items():
      file = self._file(shards[name])
      if key not in file.entries:
        raise ValueError(f"{index_path} puts {key!r} in {name}, which has no such tensor.")
      self._where[key] = shards[name]

  def keys(self) -> list[str]:
    """All tensor names, sorted."""
    return sorted(self._where)

  def __contains__(self, key: object) -> bool:
    return key in self._where

  def __len__(self) -> int:
    return len(self._where)

  def info(self, key: str) -> TensorInfo:
    """Shape, dtype and file of `key`, from the header (no tensor is read)."""
    file = self._files[self._locate(key)]
    dtype, shape, _, _ = file.entries[key]
    return TensorInfo(shape, dtype, file.path)

  def read(self, key: str) -> np.ndarray:
    """The tensor `key` as a read-only, memory-mapped numpy array (bf16 as ml_dtypes.bfloat16).

    Nothing is read from disk until the array's values are used; `np.array(x)` copies it.
    """
    return self._files[self._locate(key)].read(key)

  def _locate(self, key: str) -> str:
    if key not in self._where:
      raise KeyError(f"No tensor {key!r} in {self.path} ({len(self)} tensors).")
    return self._where[key]


def _find_weights(path: str) -> str:
  if os.path.isfile(path):
    if not path.endswith((".safetensors", ".json")):
      raise ValueError(f"{path} is neither a .safetensors file nor a sharded index .json.")
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Checkpoint folder or file {path} does not exist.")
  for name in WEIGHTS_NAMES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  # Any other single index or single weights file is unambiguous too.
  listing = sorted(os.listdir(path))
  for suffix in (".safetensors.index.json", ".safetensors"):
    found = [name for name in listing if name.endswith(suffix)]
    if len(found) == 1:
      return os.path.join(path, found[0])
    if len(found) > 1:
      raise ValueError(f"{path} holds several {suffix} files, pass one of them: {found}.")
  raise FileNotFoundError(
    f"No safetensors weights in {path} (looked for {list(WEIGHTS_NAMES)}); "
    f"it holds: {listing[:50]}."
  )


def _read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({what}): {e}.") from e


def read_config(folder: PathLike, name: str = "config.json") -> dict[str, Any]:
  """Reads `name` (e.g. `config.json`, `model_index.json`) from a checkpoint folder."""
  folder = os.fspath(folder)
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    listing = sorted(os.listdir(folder)) if os.path.isdir(folder) else "folder does not exist"
    raise FileNotFoundError(f"No {name} in {folder} ({listing}).")
  config = _read_json(path, "config")
  if not isinstance(config, dict):
    raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object.")
  return config


# --- Key mapping --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyRule:
  """Maps HF keys that fully match `pattern` to one of our dotted nnx paths.

  Attributes:
    pattern: regex, matched against the whole HF key (`re.fullmatch`).
    target: our path, a `re.Match.expand` template (`\\1`, `\\g<name>`), e.g.
      `r"blocks.\\1.attn.qkv.kernel"`. None ignores the key (e.g. `rotary_emb.inv_freq`).
      A trailing `[i]` (e.g. `r"blocks.mlp.kernel[\\1]"`) fills slice i of the leading
      (stacked-layers) axis of a scanned model's parameter.
    transform: applied to the HF numpy array, e.g. `transpose()`; None keeps it.
  """

  pattern: str | re.Pattern[str]
  target: str | None
  transform: Transform | None = None

  def __post_init__(self):
    object.__setattr__(self, "pattern", re.compile(self.pattern))


def ignore(pattern: str) -> KeyRule:
  """A rule that drops matching HF keys (buffers such as `rotary_emb.inv_freq`)."""
  return KeyRule(pattern, None)


def transpose(*axes: int) -> Transform:
  """`np.transpose(x, axes)`; no axes reverses them (torch Linear (out, in) -> (in, out))."""
  return lambda x: np.transpose(x, axes or None)


def reshape(*shape: int) -> Transform:
  """`x.reshape(shape)`, e.g. a fused (in, heads * head_dim) kernel to (in, heads, head_dim)."""
  return lambda x: x.reshape(shape)


def compose(*transforms: Transform | None) -> Transform:
  """Applies `transforms` left to right (None entries are skipped)."""

  def apply(x: np.ndarray) -> np.ndarray:
    for fn in transforms:
      x = x if fn is None else fn(x)
    return x

  return apply


class Source(NamedTuple):
  """Where one of our variables comes from: an HF key and the transform to apply."""

  hf_key: str
  transform: Transform | None


def map_keys(
  hf_keys: Iterable[str], rules: Sequence[KeyRule]
) -> tuple[dict[str, Source], list[str]]:
  """Maps HF keys to our paths; the first rule whose pattern fully matches wins.

  Returns:
    `(mapped, unexpected)`: our path -> Source, and the HF keys no rule matches.
    Keys matched by an ignore rule are in neither.

  Raises:
    ValueError: two HF keys map to the same path (a bug in the rule table).
  """
  mapped: dict[str, Source] = {}
  unexpected = []
  for key in hf_keys:
    for rule in rules:
      match = rule.pattern.fullmatch(key)
      if match:
        break
    else:
      unexpected.append(key)
      continue
    if rule.target is None:
      continue
    path = match.expand(rule.target)
    if path in mapped:
      raise ValueError(
        f"HF keys {mapped[path].hf_key!r} and {key!r} both map to {path!r}; "
        f"check the rule {rule.pattern.pattern!r}."
      )
    mapped[path] = Source(key, rule.transform)
  return mapped, unexpected


# --- Loading ------------------------------------------------------------------


@dataclasses.dataclass
class LoadReport:
  """Keys that did not line up (returned by `load_into(..., strict=False)`).

  Attributes:
    missing: our variable paths with no source (left as they were, or zeros if abstract).
    unexpected: HF keys no rule maps, or mapped to a path the model does not have.
  """

  missing: list[str]
  unexpected: list[str]


class LoadError(ValueError):
  """The checkpoint and the model do not match (missing/unexpected keys, shapes)."""


_STACKED = re.compile(r"(.*)\[(\d+)\]")


def _listed(names: Sequence[str], what: str) -> str:
  shown = "\n  ".join(names[:_MAX_LISTED])
  more = f"\n  ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return f"{len(names)} {what}:\n  {shown}{more}"


class _Host:
  """A lazily read, transformed tensor that `make_array_from_callback` slices per shard.

  Holds one Source, or one per layer for a stacked target; shapes are checked on
  construction, before anything is placed.
  """

  def __init__(self, folder: SafetensorsFolder, path: str, sources: Any, shape: tuple[int, ...]):
    self.shape = shape
    if isinstance(sources, Source):
      self.layers = None
      self.array = self._read(folder, path, sources, shape)
    else:
      self.layers = [self._read(folder, f"{path}[{i}]", s, shape[1:]) for i, s in sources]

  @staticmethod
  def _read(folder: SafetensorsFolder, path: str, source: Source, shape: tuple[int, ...]):
    raw = folder.read(source.hf_key)
    array = raw if source.transform is None else source.transform(raw)
    if tuple(array.shape) != tuple(shape):
      raise LoadError(
        f"Shape mismatch: HF {source.hf_key!r} {tuple(raw.shape)} gives {tuple(array.shape)} "
        f"after its transform, but {path!r} has shape {tuple(shape)}."
      )
    return array

  def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
    if self.layers is None:
      return self.array[index]
    # Only the layers of this shard are read, each already sliced.
    rows = range(len(self.layers))[index[0]]
    return np.stack([self.layers[i][index[1:]] for i in rows])


def _split(model: Any) -> tuple[Any, nnx.State]:
  if isinstance(model, tuple) and len(model) == 2:
    return model
  if isinstance(model, nnx.Module):
    return nnx.split(model)
  raise TypeError(
    f"load_into needs an nnx.Module or a (graphdef, state) pair, got {type(model).__name__}."
  )


def _sources(
  mapped: Mapping[str, Source], targets: Mapping[str, nnx.Variable]
) -> tuple[dict[str, Any], list[str], list[str]]:
  """Matches mapped paths to the model's variables.

  Returns:
    `(sources, missing, unknown)`: path -> Source (or a sorted list of (layer, Source) for a
    stacked target), the variables (or layers `path[i]`) with no source, and the mapped HF
    keys whose path the model does not have.
  """
  sources: dict[str, Any] = {}
  layers: dict[str, dict[int, Source]] = {}
  unknown = []
  for path, source in mapped.items():
    stacked = _STACKED.fullmatch(path)
    if path in targets:
      sources[path] = source
    elif stacked and stacked[1] in targets:
      layers.setdefault(stacked[1], {})[int(stacked[2])] = source
    else:
      unknown.append(f"{source.hf_key} -> {path} (no such variable in the model)")
  missing = []
  for path, by_layer in layers.items():
    n = targets[path].shape[0] if targets[path].shape else 0
    unknown += [
      f"{s.hf_key} -> {path}[{i}] (it has {n} layers)" for i, s in by_layer.items() if i >= n
    ]
    absent = [f"{path}[{i}]" for i in range(n) if i not in by_layer]
    if absent:
      missing += absent
    else:
      sources[path] = sorted((i, s) for i, s in by_layer.items() if i < n)
  missing += [path for path in targets if path not in sources and path not in layers]
  return sources, sorted(missing), unknown


def load_into(
  model: Any,
  folder: SafetensorsFolder | PathLike,
  rules: Sequence[KeyRule],
  *,
  aliases: Mapping[str, str | tuple[str, Transform]] | None = None,
  mesh: Mesh | None = None,
  sharding_rules: Sequence[Sequence[Any]] | None = None,
  dtype: Any = None,
  strict: bool = True,
) -> Any:
  """Fills a model's variables from a safetensors checkpoint, one tensor at a time.

  Args:
    model: an nnx.Module, usually abstract (`nnx.eval_shape(lambda: Model(cfg, rngs=...))`:
      shapes, dtypes and logical sharding names, no memory), or a `(graphdef, state)` pair.
    folder: a `SafetensorsFolder` (or a view with its `keys`, `read` and `path`) or a path.
    rules: the family's HF key -> our path table (see `KeyRule`).
    aliases: tied weights: `{target: source}` fills our `target` from the same HF key as our
      `source` when no HF key maps to `target` (e.g. `{"lm_head.kernel": ("embed.embedding",
      transpose())}` for tie_word_embeddings). A tuple adds a transform after the source's.
    mesh: when given, every array is created directly with its NamedSharding from
      `sharding.state_shardings` (each device receives only its shard, each process reads
      only its addressable shards). Without a mesh arrays go to the default device.
    sharding_rules: logical -> mesh axis rules (`config.sharding_rules`); defaults apply.
    dtype: cast floating-point variables to this dtype instead of the model's.
    strict: raise on missing or unexpected keys. When False, missing variables keep their
      value (zeros if the model was abstract) and a `LoadReport` is returned too.

  Returns:
    The model (`nnx.merge(graphdef, loaded_state)`), or `(model, LoadReport)` if not strict.

  Raises:
    LoadError: missing/unexpected keys (one error listing both, before any tensor is
      read) or a shape mismatch (naming the HF key, our path and both shapes).
  """
  graphdef, state = _split(model)
  # Anything with SafetensorsFolder's `keys` / `read` / `path` works (e.g. a renaming view).
  folder = folder if hasattr(folder, "read") else SafetensorsFolder(folder)
  flat = list(nnx.to_flat_state(state))
  targets = {".".join(str(p) for p in path): var for path, var in flat}

  mapped, unexpected = map_keys(folder.keys(), rules)
  for target, source in (aliases or {}).items():
    source, extra = (source, None) if isinstance(source, str) else source
    for name in (target, source):
      if name not in targets:
        raise ValueError(f"Alias {target!r} <- {source!r}: the model has no variable {name!r}.")
    if target not in mapped and source in mapped:
      hf_key, fn = mapped[source]
      mapped[target] = Source(hf_key, compose(fn, extra))
  sources, missing, unknown = _sources(mapped, targets)
  report = LoadReport(missing=missing, unexpected=sorted(unexpected) + unknown)
  if strict and (report.missing or report.unexpected):
    parts = [f"Checkpoint {folder.path} does not match the model."]
    if report.missing:
      parts.append(_listed(report.missing, "model variables have no checkpoint key"))
    if report.unexpected:
      parts.append(_listed(report.unexpected, "checkpoint keys are not used"))
    raise LoadError("\n".join(parts))

  shardings = None
  if mesh is not None:
    table = sharding_lib.resolve_rules(sharding_rules)
    shardings = nnx.to_flat_state(sharding_lib.state_shardings(state, mesh, table))
    shardings = {".".join(str(p) for p in path): s for path, s in shardings}

  leaves = []
  for path, var in flat:
    name = ".".join(str(p) for p in path)
    target_dtype = var.dtype
    if dtype is not None and jnp.issubdtype(var.dtype, jnp.floating):
      target_dtype = jnp.dtype(dtype)
    sharding = shardings[name] if shardings else None
    if name in sources:
      host = _Host(folder, name, sources[name], tuple(var.shape))
    elif isinstance(var.get_value(), jax.ShapeDtypeStruct):
      host = np.broadcast_to(np.zeros((), target_dtype), var.shape)  # strict=False only
    else:
      host = var.get_value()
    leaves.append((path, var.replace(_place(host, tuple(var.shape), target_dtype, sharding))))
    del host  # one tensor at a time
  loaded = nnx.merge(graphdef, nnx.from_flat_state(leaves))
  return loaded if strict else (loaded, report)


def _place(host: Any, shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.Array:
  if isinstance(host, jax.Array):
    return jax.device_put(host.astype(dtype), sharding)
  if sharding is None:
    full = tuple(slice(None) for _ in shape)
    return jnp.asarray(np.array(host[full], dtype=dtype))
  # The callback runs once per addressable device with that device's index: only
  # that slice is read from disk and cast. np.array copies, so no jax array on a
  # CPU backend aliases the file's pages (the file may be rewritten later).
  return jax.make_array_from_callback(
    shape, sharding, lambda index: np.array(host[index], dtype=dtype)
  )


# --- Writing ------------------------------------------------------------------


def save_safetensors(
  tensors: Mapping[str, Any], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
  """Writes `tensors` (numpy or fully addressable jax arrays) as one .safetensors file.

  bf16 (ml_dtypes) is written as BF16, readable by `safetensors.torch.load_file`. The file
  is written next to `path` and renamed over it, so a crash never leaves half a file.
  """
  path = os.fspath(path)
  header: dict[str, Any] = {}
  if metadata:
    bad = {k: v for k, v in metadata.items() if not isinstance(v, str)}
    if bad:
      raise ValueError(f"safetensors metadata values must be str, got {bad}.")
    header["__metadata__"] = dict(metadata)
  arrays, offset = {}, 0
  for key in sorted(tensors):
    array = np.ascontiguousarray(np.asarray(tensors[key]))
    code = _CODES.get(array.dtype.newbyteorder("<"))
    if code is None:
      raise ValueError(f"Tensor {key!r} has dtype {array.dtype}, which safetensors cannot hold.")
    array = array.astype(_DTYPES[code], copy=False)  # little-endian on disk
    header[key] = {
      "dtype": code,
      "shape": list(array.shape),
      "data_offsets": [offset, offset + array.nbytes],
    }
    arrays[key] = array
    offset += array.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the format aligns the data start to 8 bytes
  with fileio.atomic_writer(path) as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in arrays.values():
      f.write(array.tobytes())
