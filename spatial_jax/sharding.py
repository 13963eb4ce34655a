"""Device meshes, the logical-axis vocabulary, and sharded model creation.

Parameters and activations name their dimensions with *logical* axes from one
vocabulary (``LOGICAL_AXES``). A config maps those names to *mesh* axes
(``data``, ``fsdp``, ``tensor``) as plain data (``config.sharding_rules``), so a
new parallelism layout is a config change, not a code change.

Parameters are annotated with ``nnx.with_partitioning(init, names)`` (the form
that works on every flax 0.12.x, see jax_style.md pitfall 3); activations are
constrained with ``shard(x, names)`` at block boundaries. Activation names carry
an ``act_`` prefix because the right layout differs: under FSDP the ``embed``
dimension of a weight is split over ``fsdp`` while the ``act_embed`` dimension of
an activation stays whole and its batch is split instead.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# The one vocabulary of logical axis names. Model code uses only these names;
# `resolve_rules` rejects anything else so a typo fails loudly instead of
# silently replicating a large tensor.
LOGICAL_AXES: dict[str, str] = {
  # Parameter dimensions.
  "embed": "model width d (d_model) of a weight",
  "mlp": "feed-forward hidden width f",
  "heads": "attention query heads n (or fused n*h)",
  "kv_heads": "attention key/value heads (GQA)",
  "head_dim": "per-head width h",
  "vocab": "vocabulary v",
  "lora": "LoRA rank r (small: replicated)",
  "conv_in": "input channels of a convolution",
  "conv_out": "output channels of a convolution",
  "kernel_hw": "spatial taps of a convolution kernel",
  "norm": "the scale/bias vector of a normalisation layer",
  "layers": "the stacked-layer axis of scanned blocks",
  # Activation dimensions.
  "act_batch": "examples of a batch b",
  "act_seq": "token or patch positions t",
  "act_embed": "model width d of an activation",
  "act_mlp": "feed-forward hidden f of an activation",
  "act_heads": "attention heads n of an activation",
  "act_kv_heads": "key/value heads of an activation",
  "act_head_dim": "per-head width h of an activation",
  "act_vocab": "logits over the vocabulary",
  "act_hw": "image rows or columns",
  "act_channels": "image or feature-map channels",
}

# Default rules: data parallel over `data`, ZeRO-3 style parameter sharding over
# `fsdp` (weights split on `embed`, batch split over data x fsdp), Megatron
# style tensor parallelism over `tensor` (mlp / heads / vocab).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("vocab", "tensor"),
  ("lora", None),
  ("conv_in", None),
  ("conv_out", "tensor"),
  ("kernel_hw", None),
  ("norm", None),
  ("layers", None),
  ("act_batch", ("data", "fsdp")),
  ("act_seq", None),
  ("act_embed", None),
  ("act_mlp", "tensor"),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_head_dim", None),
  ("act_vocab", "tensor"),
  ("act_hw", None),
  ("act_channels", None),
)

DEFAULT_MESH: tuple[tuple[str, int], ...] = (("data", -1), ("fsdp", 1), ("tensor", 1))

Rules = tuple[tuple[str, Any], ...]
T = TypeVar("T")


def _as_axes(value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  return tuple(value)


def resolve_rules(rules: Sequence[Sequence[Any]] | None = None) -> Rules:
  """Validates logical->mesh rules; names missing from `rules` use the defaults.

  Args:
    rules: pairs `(logical_name, mesh_axes)` where `mesh_axes` is None, a mesh
      axis name or a sequence of them. Typically `config.sharding_rules`.

  Returns:
    The complete rule table as a tuple of pairs (hashable, usable by
    `nnx.logical_axis_rules`).

  Raises:
    ValueError: an unknown logical name or mesh axis, naming it.
  """
  table = dict(DEFAULT_RULES)
  for entry in rules or ():
    if len(entry) != 2:
      raise ValueError(f"A sharding rule must be (logical_name, mesh_axes), got {entry!r}.")
    name, axes = entry
    if name not in LOGICAL_AXES:
      raise ValueError(
        f"Unknown logical axis {name!r} in sharding rules; known: {sorted(LOGICAL_AXES)}."
      )
    for axis in _as_axes(axes):
      if axis not in MESH_AXES:
        raise ValueError(
          f"Sharding rule for {name!r} names mesh axis {axis!r}; mesh axes are {MESH_AXES}."
        )
    table[name] = None if axes is None else (axes if isinstance(axes, str) else tuple(axes))
  return tuple(table.items())


def make_mesh(
  mesh_spec: Sequence[Sequence[Any]] | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a mesh over (`data`, `fsdp`, `tensor`) from config data.

  Args:
    mesh_spec: pairs `(axis_name, size)`, e.g. `[("data", -1), ("tensor", 2)]`.
      At most one size may be -1, meaning "all remaining devices". Axes not
      listed get size 1, so every mesh has all three axes and every rule
      resolves.
    devices: devices to use (default: all of `jax.devices()`).

  Returns:
    A `jax.sharding.Mesh` whose axes are all `AxisType.Auto`: GSPMD propagates
    shardings, as the models are written for (jax_style.md pitfall 2).
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = dict.fromkeys(MESH_AXES, 1)
  seen = set()
  for entry in mesh_spec if mesh_spec is not None else DEFAULT_MESH:
    name, size = entry
    if name not in MESH_AXES:
      raise ValueError(f"Unknown mesh axis {name!r}; mesh axes are {MESH_AXES}.")
    if name in seen:
      raise ValueError(f"Mesh axis {name!r} is listed twice in {mesh_spec!r}.")
    seen.add(name)
    sizes[name] = int(size)
  auto = [name for name, size in sizes.items() if size == -1]
  if len(auto) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {auto} in {mesh_spec!r}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"Mesh axis sizes must be positive or -1, got {mesh_spec!r}.")
  if auto:
    if len(devices) % fixed:
      raise ValueError(
        f"Mesh {mesh_spec!r}: {len(devices)} devices are not divisible by the fixed axes ({fixed})."
      )
    sizes[auto[0]] = len(devices) // fixed
  total = math.prod(sizes.values())
  if total != len(devices):
    raise ValueError(
      f"Mesh {mesh_spec!r} needs {total} devices but {len(devices)} are available; "
      "use -1 for one axis to take the rest."
    )
  shape = tuple(sizes[name] for name in MESH_AXES)
  device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Maps logical dimension names to a PartitionSpec under `rules`.

  A mesh axis is used at most once per spec: a later dimension whose rule names
  an axis already taken is replicated (e.g. a (heads, mlp) kernel with both on
  `tensor` shards only the first), which is what GSPMD requires.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in LOGICAL_AXES:
      raise ValueError(f"Unknown logical axis {name!r}; known: {sorted(LOGICAL_AXES)}.")
    axes = tuple(axis for axis in _as_axes(table.get(name)) if axis not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


# The rules of the innermost `axis_rules` context, read by `shard`.
_ACTIVE_RULES: list[Rules] = []


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[Rules]:
  """Makes `rules` active for `shard` and for nnx parameter annotations."""
  _ACTIVE_RULES.append(rules)
  try:
    with nnx.logical_axis_rules(rules):
      yield rules
  finally:
    _ACTIVE_RULES.pop()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[Mesh]:
  """The context every trainer runs in: the mesh plus the logical rules."""
  with jax.set_mesh(mesh), axis_rules(rules):
    yield mesh


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names.

  Outside a mesh (or with no rules active) this is the identity, so model code
  can call it unconditionally, e.g. in a test that runs a model on one device.
  """
  if x.ndim != len(names):
    raise ValueError(f"shard: array of rank {x.ndim} got {len(names)} names {tuple(names)}.")
  mesh = jax.sharding.get_abstract_mesh()
  if not _ACTIVE_RULES or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, _ACTIVE_RULES[-1]))


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules) -> NamedSharding:
  """The NamedSharding for a batch/array with logical dimension `names`."""
  return NamedSharding(mesh, logical_to_spec(names, rules))


def variable_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical dimension names a Variable was annotated with, if any."""
  metadata = variable.get_metadata()
  # `out_sharding` since flax 0.12.4, `sharding_names` before (pitfall 3).
  for key in ("out_sharding", "sharding_names"):
    if metadata.get(key):
      return tuple(metadata[key])
  return None


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for an (abstract or concrete) nnx.State under `rules`.

  Resolved with `logical_to_spec` (the same resolver as `shard`), so a mesh
  axis is never used twice in one spec; variables without names are replicated.
  """

  def to_sharding(variable):
    names = variable_names(variable)
    spec = PartitionSpec() if names is None else logical_to_spec(names, rules)
    return NamedSharding(mesh, spec)

  return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(ctor: Callable[[], T], mesh: Mesh, rules: Rules) -> T:
  """Creates an NNX module whose parameters are born sharded.

  The constructor is first traced abstractly (`nnx.eval_shape`: no memory), the
  logical names on its variables give each one a NamedSharding, and a jitted
  constructor with those `out_shardings` materialises every shard directly on
  its device: no device ever holds a full unsharded copy of a large model.

  Args:
    ctor: builds the module, e.g. `lambda: Model(cfg, rngs=nnx.Rngs(0))`.
    mesh: the device mesh.
    rules: logical->mesh rules (see `resolve_rules`).

  Returns:
    The module, with every array sharded as its annotations and `rules` say.
  """
  # flax's eager sharding would resolve the names itself (without our
  # one-axis-per-spec rule); here the jit's out_shardings place every array.
  # The abstract trace runs outside the mesh because nnx.eval_shape resolves
  # names itself when a mesh is active.
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(ctor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    with jax.set_mesh(mesh):
      state = jax.jit(lambda: nnx.state(ctor()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def data_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a batch array: leading dim over `act_batch`, rest replicated."""
  return named_sharding(mesh, ("act_batch",) + (None,) * (ndim - 1), rules)


def process_batch_shard(mesh: Mesh, rules: Rules) -> tuple[int, int]:
  """(index, count): which distinct slice of an `act_batch` batch this process holds.

  A data loader shards by it (`shard_index`, `shard_count`) and the per-process batches become
  one global batch with `process_local_to_global`. Processes whose devices hold the same rows
  (the batch replicated across them) get the same index, so they load the same data. Usually
  (the batch axes outermost in the mesh) this is `(jax.process_index(), jax.process_count())`.

  Raises:
    ValueError: the processes' rows are not equal, contiguous blocks (a mesh whose batch axes
      interleave devices of different processes).
  """
  n = mesh.devices.size
  indices = data_sharding(mesh, rules, 1).devices_indices_map((n,))
  rows: dict[int, set[tuple[int, int]]] = {}
  for device, (index,) in indices.items():
    start, stop, _ = index.indices(n)
    rows.setdefault(device.process_index, set()).add((start, stop))
  blocks = {}
  for process, spans in rows.items():
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    covered = set().union(*(range(s, e) for s, e in spans))
    if covered != set(range(start, stop)):
      raise ValueError(
        f"Process {process} holds batch rows {sorted(spans)}: not one contiguous block. Put the "
        "mesh's batch axes (act_batch's, e.g. data/fsdp) outermost so each process holds one."
      )
    blocks[process] = (start, stop)
  distinct = sorted(set(blocks.values()))
  if len({stop - start for start, stop in distinct}) != 1 or (
    sum(stop - start for start, stop in distinct) != n
  ):
    raise ValueError(f"The processes' batch rows {distinct} do not split the batch evenly.")
  return distinct.index(blocks[jax.process_index()]), len(distinct)


def process_local_to_global(local: Any, shardings: Any) -> Any:
  """Per-process pieces of a batch -> global `jax.Array`s (a pytree, with matching shardings).

  Each process passes the rows its devices hold (its `process_batch_shard` slice, in order);
  dimensions a sharding does not split across processes are passed whole. With one process this
  is a `device_put`. Shapes must be the same on every process (pad to fixed shapes).
  """
  return jax.tree.map(
    lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local, shardings
  )


def to_host(x: jax.Array) -> np.ndarray:
  """The whole array as a host numpy array; a sharded one that spans processes is gathered
  (then every process must call it)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def place(tree: Any, shardings: Any) -> Any:
  """`jax.device_put` that also works across processes: an array local to one process (host
  data, or a jax array on its own devices) that every process holds the same copy of goes
  through the host to devices of other processes; a global array is resharded on the devices.
  `shardings`: one sharding for every leaf, or a matching pytree."""

  def put(x: Any, to: jax.sharding.Sharding) -> Any:
    if isinstance(x, jax.Array) and x.is_fully_addressable and not to.is_fully_addressable:
      x = np.asarray(x)
    return jax.device_put(x, to)

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: put(x, shardings), tree)
  return jax.tree.map(put, tree, shardings)


def take(x: jax.Array, indices: Any, axis: int, out_sharding: NamedSharding) -> jax.Array:
  """`jnp.take(x, indices, axis)` placed as `out_sharding`, for arrays that span processes too.

  An eager gather on such an array cannot pick its output sharding (jax asks for one), so the
  gather runs jitted with the sharding given; one compiled program per (axis, sharding, shape).
  """
  return _jitted_take(axis, out_sharding)(x, np.asarray(indices, np.int32))


@functools.lru_cache(maxsize=64)
def _jitted_take(axis: int, out_sharding: NamedSharding) -> Callable[..., jax.Array]:
  return jax.jit(lambda x, i: jax.numpy.take(x, i, axis=axis), out_shardings=out_sharding)


def process_rows(n: int, mesh: Mesh, rules: Rules) -> slice | None:
  """The rows of an n-row host batch this process works on when the processes split host-side
  work (decoding to files, rule-based rewards): a contiguous block, in `process_batch_shard`
  order; None with one process (every row)."""
  if jax.process_count() == 1:
    return None
  index, count = process_batch_shard(mesh, rules)
  bounds = np.linspace(0, n, count + 1).round().astype(int)
  return slice(int(bounds[index]), int(bounds[index + 1]))


def gather_rows(local: np.ndarray, rows: slice | None, n: int) -> np.ndarray:
  """Every process's `process_rows` block of an (n, ...) host array -> the whole array, the same
  on every process. Processes with the same block (a batch replicated across them) agree."""
  if rows is None:
    return np.asarray(local)
  from jax.experimental import multihost_utils

  local = np.asarray(local)
  full = np.zeros((n, *local.shape[1:]), local.dtype)
  covered = np.zeros(n, bool)
  full[rows], covered[rows] = local, True
  fulls, covers = multihost_utils.process_allgather((full, covered))
  first = np.argmax(covers, axis=0)  # The first process that holds each row.
  return fulls[first, np.arange(n)]


def active_batch_split() -> int:
  """How many ways the active mesh and rules split `act_batch` (1 outside `use_mesh`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not _ACTIVE_RULES or mesh.empty:
    return 1
  return batch_shard_count(mesh, _ACTIVE_RULES[-1])


def batch_shard_count(mesh: jax.sharding.Mesh, rules: Rules) -> int:
  """How many ways the batch dimension is split (`act_batch`'s mesh axes)."""
  spec = logical_to_spec(("act_batch",), rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return int(np.prod([mesh.shape[a] for a in axes]))
