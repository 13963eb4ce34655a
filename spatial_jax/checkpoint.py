"""Checkpoints: trainable state + optimizer + data iterator + rng + step, in one place.

A thin wrapper over the V0 `orbax.checkpoint.CheckpointManager`, so that the switch to the V1 API
touches only this file (jax_style.md §5, §7.20). Every trainer uses it:

  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3, save_interval_steps=100,
                                 metadata={"base_model": config.model.path})
  start = 0
  if ckpt.latest_step() is not None:
    r = ckpt.restore(params=lora_state, opt_state=opt_state, data_iter=train_iter, rng=rng)
    start, lora_state, opt_state, rng = r.step, r.params, r.opt_state, r.rng
  for step in range(start + 1, total + 1):
    ...
    ckpt.save(step, params=lora_state, opt_state=opt_state, data_iter=train_iter, rng=rng,
              force=step == total)
  ckpt.close()  # waits for the last async save

On disk, `<workdir>/checkpoints/<step>/` holds one orbax item per piece: `params`, `opt_state`,
`rng` (pytrees of arrays), `data` (a grain iterator state, JSON) and `_CHECKPOINT_METADATA` (JSON,
with our metadata under `custom_metadata`). Frozen base weights are never saved: record where they
come from in `metadata` (the `base_model` entry is checked on restore, see `Checkpointer`).

Orbax writes each step into `<step>.orbax-checkpoint-tmp-<time>` and renames it when finished, so
an interrupted save leaves only a tmp dir that `latest_step()` ignores; older steps are deleted only
after a newer one is finalized. Tmp dirs are not cleaned up on start (orbax's
`cleanup_tmp_directories`), because an evaluator opening a trainer's workdir would then delete the
trainer's save in flight; a leftover tmp dir is ignored and a re-save of its step uses a new name.

Once a step is on disk (at the next save, `wait_until_finished` or `close`), process 0 records the
SHA-256 of its files in `<step>/checksums.sha256` (local directories); a restore checks them
first, so a checkpoint whose bytes changed afterwards (a flipped bit, a file cut short) is
damaged, and a resume falls back to the step before it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from spatial_jax import fileio

# Items of one checkpoint (orbax "Composite" item names).
_ARRAY_ITEMS = ("params", "opt_state", "rng")
_DATA_ITEM = "data"
# Keys of orbax's per-step `custom_metadata`.
_PROVENANCE = "provenance"
_FORMAT = "spatial_jax_checkpoint"
_FORMAT_VERSION = 1
# The provenance entry compared on restore: where the frozen base weights come from.
BASE_MODEL_KEY = "base_model"
# At most this many entries of each kind are listed in a mismatch error.
_MAX_LISTED = 20


# The largest |weight| a checkpoint may hold (`max_abs_param`): trained weights are O(1)-O(100);
# a run whose weights pass this has diverged, even if every value is still finite.
MAX_ABS_PARAM = 1e4
# The loss guard's default: a logged loss this many times the median of the recent ones stops.
MAX_LOSS_RATIO = 100.0


class DivergedError(FloatingPointError):
  """Weights that are not finite or beyond `max_abs_param`: at a save, or in a checkpoint."""


class DamagedCheckpointError(OSError):
  """No checkpoint of a workdir can be read (its files are damaged or cut short)."""


@jax.jit
def _max_abs(x: jax.Array) -> jax.Array:
  return jax.numpy.max(jax.numpy.abs(x)).astype(np.float32)


def max_abs_param(params: Any) -> float:
  """The largest |value| of the floating-point leaves of `params` (NaN if any is NaN). Leaf by
  leaf: the leaves may live on different devices (a state of several models)."""
  leaves = [x for x in jax.tree.leaves(params) if np.issubdtype(x.dtype, np.floating)]
  from spatial_jax import sharding  # Lazy: sharding imports flax; this module stays light.

  values = [float(sharding.to_host(_max_abs(x))) for x in leaves]
  return float(np.max(values)) if values else 0.0


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the restore target (or was trained on another base model)."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore` returns. Items that were not asked for are None."""

  step: int
  params: Any
  opt_state: Any
  rng: Any
  metadata: dict[str, Any]


class Checkpointer:
  """Saves and restores a training run's state under `<workdir>/checkpoints`.

  Args:
    workdir: the run's directory (local path or any path `etils.epath` understands, e.g. gs://).
    max_to_keep: keep only the newest N finalized checkpoints; None keeps all.
    save_interval_steps: `save` writes only at steps divisible by this (or with `force=True`).
    async_save: write in a background thread. `save` returns once the arrays are copied to host
      memory, so the caller may donate or overwrite them; `wait_until_finished`/`close` block until
      the write is on disk.
    metadata: JSON-serializable provenance recorded with every save (the frozen base weights' path
      under `base_model`, the config, a git hash, ...). Read it back with `metadata()`.
    base_model_mismatch: what `restore` does when the checkpoint's recorded `base_model` differs
      from this Checkpointer's: "warn" (default; the same weights often live at another path on
      another host) or "error" (raise `CheckpointMismatchError`). Nothing is checked if either side
      records no `base_model`.
    max_abs_param: the divergence guard. A save whose `params` hold a non-finite value or one
      beyond this magnitude is refused (`DivergedError`, naming the last good checkpoint), and so
      is restoring such params; None turns the guard off.
  """

  def __init__(
    self,
    workdir: str | os.PathLike[str],
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
    metadata: Mapping[str, Any] | None = None,
    base_model_mismatch: Literal["warn", "error"] = "warn",
    max_abs_param: float | None = MAX_ABS_PARAM,
  ):
    if base_model_mismatch not in ("warn", "error"):
      raise ValueError(
        f"base_model_mismatch must be 'warn' or 'error', got {base_model_mismatch!r}"
      )
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self._metadata = dict(metadata or {})
    try:  # Fail here, not in orbax's background thread at the first save.
      json.dumps(self._metadata)
    except TypeError as e:
      raise TypeError(f"Checkpointer metadata must be JSON-serializable: {e}") from e
    self._base_model_mismatch = base_model_mismatch
    self._max_abs_param = max_abs_param

    directory = epath.Path(workdir) / "checkpoints"
    if "://" not in os.fspath(directory):  # orbax wants absolute local paths.
      directory = epath.Path(os.path.abspath(directory))
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.AnySavePolicy(
        [
          policies.FixedIntervalPolicy(save_interval_steps),
          policies.PreemptionCheckpointingPolicy(),
        ]
      ),
      preservation_policy=policies.LatestN(max_to_keep),
      enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
      directory, options=options, handler_registry=_handler_registry()
    )
    self._closed = False
    self._damaged: set[int] = set()  # Steps a resume found unreadable; a save replaces them.
    self._checksummed: set[int] = set()  # Steps whose checksums are recorded.

  @property
  def directory(self) -> epath.Path:
    return self._manager.directory

  def all_steps(self) -> list[int]:
    """Saved steps, ascending: finalized ones plus this process's async save in flight."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None. Unfinished tmp dirs on disk are ignored; this process's
    own async save in flight counts (`restore`/`metadata` wait for it)."""
    return self._manager.latest_step()

  def save(
    self,
    step: int,
    *,
    params: Any,
    opt_state: Any = None,
    data_iter: grain.DatasetIterator | None = None,
    rng: jax.Array | None = None,
    force: bool = False,
  ) -> bool:
    """Saves one checkpoint if `step` is due (interval) or `force`; returns whether it saved.

    A step that is already saved is skipped (returns False), so a forced save at the last step
    after an interval save at the same step is harmless. Items passed as None are not saved.
    """
    step = int(step)
    if step in self._damaged:
      # The resume skipped this step as unreadable; the run is back at it, so a good checkpoint
      # can take its place (and a later resume will not stumble on it again).
      logging.warning("Replacing the damaged checkpoint %s", self.directory / str(step))
      self._manager.delete(step)
      self._damaged.discard(step)
      self._checksummed.discard(step)
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists; not saving again.", step)
      return False
    if self._max_abs_param and (force or self._manager.should_save(step)):
      largest = max_abs_param(params)
      if not np.isfinite(largest) or largest > self._max_abs_param:
        self.wait_until_finished()
        raise DivergedError(
          f"The run diverged: at step {step} the largest |weight| is {largest:.3g} (the guard "
          f"is config.train.max_abs_param={self._max_abs_param:g}); not saved. The last good "
          f"checkpoint is step {self.latest_step()} in {self.directory}. Lower config.train.lr."
        )
    items = {"params": ocp.args.StandardSave(params)}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    rng_impl = None
    if rng is not None:
      if _is_typed_key(rng):  # Typed keys have no on-disk dtype: store the raw key data.
        rng_impl = _impl(rng)
        rng = jax.random.key_data(rng)
      # StandardSave refuses a bare array, hence the dict.
      items["rng"] = ocp.args.StandardSave({"key_data": rng})
    if data_iter is not None:
      items[_DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iter)
    custom_metadata = {
      _PROVENANCE: self._metadata,
      _FORMAT: {"version": _FORMAT_VERSION, "items": sorted(items), "rng_impl": rng_impl},
    }
    if force or self._manager.should_save(step):
      # orbax waits for the previous save before it starts the next one anyway; waiting here
      # first lets its checksums be recorded.
      self.wait_until_finished()
    saved = self._manager.save(
      step, args=ocp.args.Composite(**items), force=force, custom_metadata=custom_metadata
    )
    if saved:
      logging.info("Saving checkpoint for step %d to %s", step, self.directory)
    return saved

  def metadata(self, step: int | None = None) -> dict[str, Any]:
    """The provenance `metadata` recorded with `step` (default: latest); reads JSON only."""
    self._manager.wait_until_finished()
    return dict(self._step_metadata(self._resolve_step(step)).get(_PROVENANCE, {}))

  def restore(
    self,
    step: int | None = None,
    *,
    params: Any = None,
    opt_state: Any = None,
    data_iter: grain.DatasetIterator | None = None,
    rng: jax.Array | jax.ShapeDtypeStruct | None = None,
  ) -> Restored:
    """Restores `step` (default: the latest) into the given targets.

    Targets give the tree structure, shapes, dtypes and shardings: concrete arrays or
    `jax.ShapeDtypeStruct`s (e.g. from `nnx.eval_shape` / `jax.eval_shape`); restored arrays take
    the target's sharding (a ShapeDtypeStruct without `.sharding` gets the saved one). Items left as
    None are not restored (e.g. params only, for evaluation). `data_iter` is restored in place.
    `rng` may be a typed key (returned typed) or a raw uint32 key.

    Before reading any array, the targets are compared with the checkpoint's stored tree metadata;
    any difference (entries missing in the checkpoint, unexpected entries, shape or dtype
    mismatches, by tree path) raises `CheckpointMismatchError` listing all of them.

    Without `step`, a newest checkpoint that cannot be read (files damaged or cut short, e.g. by
    a full disk) is skipped with a warning naming it, and the newest readable one is restored;
    the error of the newest is raised when none can be read. A checkpoint that does not fit
    the targets, or holds diverged weights, is never skipped: older ones would not do better.

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in the directory.
      CheckpointMismatchError: the checkpoint does not fit the targets, or (with
        `base_model_mismatch="error"`) was trained on another base model.
      DivergedError: the params hold a non-finite value or one beyond `max_abs_param`.
    """
    self._manager.wait_until_finished()  # orbax does not wait before reading.
    if step is not None:
      return self._restore_step(self._resolve_step(step), params, opt_state, data_iter, rng)
    self._resolve_step(None)  # FileNotFoundError when there is none.
    first_error = None
    for candidate in reversed(self.all_steps()):
      try:
        restored = self._restore_step(candidate, params, opt_state, data_iter, rng)
      except (CheckpointMismatchError, DivergedError):
        raise
      except Exception as e:  # noqa: BLE001 - what a damaged file raises depends on the item.
        logging.warning(
          "Checkpoint %s cannot be read (%s: %s); trying the one before it.",
          self.directory / str(candidate),
          type(e).__name__,
          str(e).splitlines()[0][:300] if str(e) else "",
        )
        first_error = first_error or e
        self._damaged.add(candidate)
        continue
      if first_error is not None:
        logging.warning(
          "Resuming from step %d, the newest checkpoint that could be read in %s.",
          candidate,
          self.directory,
        )
      return restored
    raise DamagedCheckpointError(
      f"No checkpoint in {self.directory} can be read (steps {self.all_steps()}); the newest "
      f"failed with {type(first_error).__name__}: {first_error}"
    ) from first_error

  def _restore_step(self, step, params, opt_state, data_iter, rng) -> Restored:
    """`restore` of one existing step."""
    self.verify(step)
    step_meta = self._step_metadata(step)
    fmt = step_meta.get(_FORMAT, {})
    provenance = dict(step_meta.get(_PROVENANCE, {}))
    self._check_base_model(step, provenance)

    targets = {"params": params, "opt_state": opt_state}
    if rng is not None:
      targets["rng"] = {"key_data": _abstract_key_data(rng)}
    targets = {k: v for k, v in targets.items() if v is not None}
    if not targets and data_iter is None:
      raise ValueError("restore() needs at least one target (params, opt_state, data_iter, rng).")
    saved_items = set(fmt.get("items") or self._manager.item_metadata(step).keys())
    wanted = set(targets) | ({_DATA_ITEM} if data_iter is not None else set())
    problems = [
      f"{name}: missing in checkpoint (not saved)" for name in sorted(wanted - saved_items)
    ]
    if rng is not None and _is_typed_key(rng) and fmt.get("rng_impl") not in (None, _impl(rng)):
      problems.append(f"rng: key impl {fmt['rng_impl']} in checkpoint, {_impl(rng)} in target")
    item_meta = self._manager.item_metadata(step)
    for name in sorted(set(targets) & saved_items):
      problems += _tree_mismatches(name, item_meta[name].tree, targets[name])
    if problems:
      raise CheckpointMismatchError(
        f"Checkpoint {self.directory / str(step)} does not fit the restore target:\n  "
        + "\n  ".join(problems)
      )

    args = {k: ocp.args.StandardRestore(jax.tree.map(_abstract, v)) for k, v in targets.items()}
    if data_iter is not None:
      args[_DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iter)
    logging.info("Restoring checkpoint step %d from %s (%s)", step, self.directory, sorted(args))
    out = self._manager.restore(step, args=ocp.args.Composite(**args))
    if params is not None and self._max_abs_param:
      largest = max_abs_param(out["params"])
      if not np.isfinite(largest) or largest > self._max_abs_param:
        raise DivergedError(
          f"Checkpoint {self.directory / str(step)} holds a weight of magnitude {largest:.3g} "
          f"(the guard is max_abs_param={self._max_abs_param:g}): it comes from a diverged run. "
          "Do not continue from it: delete that step (or the workdir) and rerun, with a lower "
          "learning rate."
        )
    restored_rng = None
    if rng is not None:
      restored_rng = out["rng"]["key_data"]
      if _is_typed_key(rng):
        restored_rng = jax.random.wrap_key_data(restored_rng, impl=_impl(rng))
    return Restored(
      step=step,
      params=out["params"] if params is not None else None,
      opt_state=out["opt_state"] if opt_state is not None else None,
      rng=restored_rng,
      metadata=provenance,
    )

  def wait_until_finished(self) -> None:
    """Blocks until pending async saves are on disk (re-raising their errors), then records the
    checksums of the steps that have none yet."""
    self._manager.wait_until_finished()
    self._record_checksums()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads. Idempotent."""
    if not self._closed:
      self._closed = True
      try:
        self._manager.wait_until_finished()
        self._record_checksums()
      finally:
        self._manager.close()

  def _local_step_dir(self, step: int) -> str | None:
    directory = os.fspath(self.directory)
    return None if "://" in directory else os.path.join(directory, str(step))

  def _record_checksums(self) -> None:
    """`checksums.sha256` in every finalized step that lacks one (process 0, local paths)."""
    if jax.process_index() != 0:
      return
    for step in self._manager.all_steps():
      folder = self._local_step_dir(step)
      if folder and os.path.isdir(folder) and step not in self._checksummed:
        if not os.path.exists(os.path.join(folder, fileio.CHECKSUMS_FILE)):
          fileio.write_checksums(folder)
        self._checksummed.add(step)

  def verify(self, step: int) -> None:
    """Checks step's files against its `checksums.sha256` (a step without one passes).

    Raises:
      DamagedCheckpointError: naming the file that is missing or changed.
    """
    folder = self._local_step_dir(step)
    if folder is None:
      return
    try:
      fileio.verify_checksums(folder, f"checkpoint {folder}")
    except ValueError as e:
      raise DamagedCheckpointError(str(e)) from None

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # -- helpers ------------------------------------------------------------------------------------

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No finalized checkpoint in {self.directory}")
    elif int(step) not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; have {steps}")
    return int(step)

  def _step_metadata(self, step: int) -> dict[str, Any]:
    return dict(self._manager.metadata(step).custom_metadata or {})

  def _check_base_model(self, step: int, provenance: Mapping[str, Any]) -> None:
    saved, current = provenance.get(BASE_MODEL_KEY), self._metadata.get(BASE_MODEL_KEY)
    if saved is None or current is None or saved == current:
      return
    msg = (
      f"Checkpoint step {step} in {self.directory} was trained on base model {saved!r}, "
      f"but this run uses {current!r}."
    )
    if self._base_model_mismatch == "error":
      raise CheckpointMismatchError(msg)
    warnings.warn(msg, stacklevel=3)
    logging.warning(msg)


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Registers every item's handler up front, so metadata is readable before any save/restore."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for name in _ARRAY_ITEMS:
    registry.add(name, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add(name, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  registry.add(_DATA_ITEM, grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointHandler)
  registry.add(_DATA_ITEM, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler)
  return registry


def _is_typed_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _impl(key: Any) -> str:
  """The PRNG impl name ('threefry2x32', ...) of a typed key, concrete or abstract."""
  if isinstance(key, jax.Array):
    return str(jax.random.key_impl(key))
  found = []  # key_impl rejects ShapeDtypeStructs but accepts tracers.
  jax.eval_shape(lambda k: found.append(str(jax.random.key_impl(k))), key)
  return found[0]


def _abstract_key_data(rng: Any) -> Any:
  """The uint32 key data that a (typed or raw, concrete or abstract) rng target restores into."""
  if not _is_typed_key(rng):
    return rng
  if isinstance(rng, jax.Array):
    return jax.random.key_data(rng)  # Keeps the key's sharding.
  return jax.eval_shape(jax.random.key_data, rng)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  """Restore target leaf: shape, dtype and (for jax arrays) sharding, no data."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _path_str(path: tuple[Any, ...]) -> str:
  """'a/0/b' for a jax key path; dict keys, attributes and indices all read alike, so a target's
  namedtuple/nnx.State paths compare equal to the dicts/lists of orbax's stored metadata."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _flatten(tree: Any) -> dict[str, Any]:
  return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _listed(lines: list[str], what: str) -> list[str]:
  more = len(lines) - _MAX_LISTED
  return lines[:_MAX_LISTED] + ([f"... and {more} more {what}"] if more > 0 else [])


def _tree_mismatches(item: str, saved_tree: Any, target: Any) -> list[str]:
  """Differences between an item's stored metadata tree and its target, one line per entry."""
  saved, wanted = _flatten(saved_tree), _flatten(target)
  missing = [f"{item}/{p}: missing in checkpoint" for p in sorted(wanted.keys() - saved.keys())]
  unexpected = [
    f"{item}/{p}: unexpected in checkpoint (not in target)"
    for p in sorted(saved.keys() - wanted.keys())
  ]
  differ = []
  for path in sorted(saved.keys() & wanted.keys()):
    meta, leaf = saved[path], wanted[path]
    m_shape, t_shape = getattr(meta, "shape", None), tuple(np.shape(leaf))
    m_dtype = getattr(meta, "dtype", None)
    t_dtype = np.dtype(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype)
    if (m_shape is not None and tuple(m_shape) != t_shape) or (
      m_dtype is not None and np.dtype(m_dtype) != t_dtype
    ):
      differ.append(
        f"{item}/{path}: shape/dtype differ: checkpoint {tuple(m_shape or ())} {m_dtype}, "
        f"target {t_shape} {t_dtype}"
      )
  return (
    _listed(missing, "missing")
    + _listed(unexpected, "unexpected")
    + _listed(differ, "shape/dtype mismatches")
  )


def check_finite(aux: dict[str, Any], step: int, ckpt: Checkpointer, what: str, every: int) -> None:
  """Pops the train step's `aux["finite"]` (fetched to the host) and stops a run that is not.

  Waits for pending saves first, so the error names a complete last good checkpoint, which is
  left as it is.

  Raises:
    FloatingPointError: naming the step, the loss and gradient norm, and that checkpoint.
  """
  if aux.pop("finite"):
    return
  ckpt.wait_until_finished()
  raise FloatingPointError(
    f"Non-finite {what} at step {step}: loss {aux['loss']}, grad norm {aux['grad_norm']} "
    f"(checked every {every} steps and before each save); the last good checkpoint is step "
    f"{ckpt.latest_step()} in {ckpt.directory}. Lower config.train.lr or check the data."
  )


class LossGuard:
  """Stops a run whose loss explodes, before its weights do (`max_abs_param`) or turn non-finite.

  Each logged loss is compared with the median of the last `window` logged ones (after `warmup`
  of them); one beyond `ratio` times that median stops the run with `DivergedError`, naming the
  step, both values and the last good checkpoint (saves pending are finished first, so it is
  complete). Meant for losses that stay positive (Bradley-Terry, flow matching, cross-entropy);
  a resumed run warms up again. `ratio` None or 0: off.
  """

  def __init__(self, ratio: float | None, *, window: int = 20, warmup: int = 5):
    self.ratio, self.warmup = ratio, warmup
    self._recent: collections.deque[float] = collections.deque(maxlen=window)

  def check(self, loss: float, step: int, ckpt: Checkpointer, what: str) -> None:
    loss = float(loss)
    if not self.ratio:
      return
    if len(self._recent) >= self.warmup:
      typical = float(np.median(self._recent))
      if typical > 0 and loss > self.ratio * typical:
        ckpt.wait_until_finished()
        raise DivergedError(
          f"The {what} loss exploded at step {step}: {loss:.4g}, against a median of "
          f"{typical:.4g} over the last {len(self._recent)} logged steps (the guard is "
          f"config.train.max_loss_ratio={self.ratio:g}). The last good checkpoint is step "
          f"{ckpt.latest_step()} in {ckpt.directory}. Lower config.train.lr."
        )
    self._recent.append(loss)
