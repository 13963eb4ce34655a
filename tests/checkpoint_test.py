"""Tests for spatial_jax.checkpoint (orbax + grain, 8 fake CPU devices from conftest)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spatial_jax import checkpoint


class _Tiny(nnx.Module):
  """A frozen Linear plus LoRA adapters; only the LoRA state is checkpointed."""

  def __init__(self, rngs: nnx.Rngs):
    self.base = nnx.Linear(4, 8, rngs=rngs)
    self.lora = nnx.LoRA(4, 2, 8, rngs=rngs)
    self.layers = nnx.List([nnx.LoRA(8, 2, 8, rngs=rngs) for _ in range(2)])


def _lora_state(seed: int):
  return nnx.state(_Tiny(nnx.Rngs(seed)), nnx.LoRAParam)


def _dataset():
  return grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset()


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_round_trip_params_adam_rng_and_iterator(tmp_path):
  params = _lora_state(0)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  # One real update, so the optimizer state is not all zeros.
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  rng = jax.random.key(7)
  it = iter(_dataset())
  for _ in range(3):
    next(it)
  expected_next = [np.asarray(next(_skip(iter(_dataset()), 3 + i))) for i in range(2)]

  with checkpoint.Checkpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(5, params=params, opt_state=opt_state, data_iter=it, rng=rng)
    # The iterator position is captured at save() time, not when the async write ends.
    next(it)
    next(it)

  fresh_params, fresh_opt = _lora_state(1), tx.init(_lora_state(1))
  fresh_it = iter(_dataset())
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    r = ckpt.restore(
      params=fresh_params, opt_state=fresh_opt, data_iter=fresh_it, rng=jax.random.key(0)
    )
  assert r.step == 5
  assert isinstance(r.params, nnx.State)
  _assert_trees_equal(r.params, params)
  _assert_trees_equal(r.opt_state, opt_state)
  assert type(r.opt_state[0]) is type(opt_state[0])  # ScaleByAdamState, not a dict.
  assert jax.dtypes.issubdtype(r.rng.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(r.rng), jax.random.key_data(rng))
  # Resumed iterator continues from the element after the 3 consumed before the save.
  for want in expected_next:
    np.testing.assert_array_equal(next(fresh_it), want)


def _skip(it, n):
  for _ in range(n):
    next(it)
  return it


def test_rng_forms_and_abstract_targets(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  raw = jax.random.PRNGKey(3)  # Legacy raw uint32 key.
  typed = jax.random.key(4)
  with checkpoint.Checkpointer(tmp_path, async_save=True) as ckpt:
    ckpt.save(1, params=params, rng=raw)
    ckpt.save(2, params=params, rng=typed)
    # Restoring right after an async save (no explicit wait) reads the finished step.
    r = ckpt.restore(1, params=jax.eval_shape(lambda: params), rng=jax.eval_shape(lambda: raw))
    np.testing.assert_array_equal(r.params["w"], params["w"])
    assert r.rng.dtype == jnp.uint32 and r.opt_state is None
    np.testing.assert_array_equal(r.rng, raw)
    # An abstract typed key target gives a typed key back.
    r = ckpt.restore(2, params=params, rng=jax.eval_shape(lambda: jax.random.key(0)))
    assert str(jax.random.key_impl(r.rng)) == "threefry2x32"
    np.testing.assert_array_equal(jax.random.key_data(r.rng), jax.random.key_data(typed))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="rng: key impl threefry2x32"):
      ckpt.restore(2, rng=jax.random.key(0, impl="rbg"))


def test_interval_keep_last_n_and_resume_latest(tmp_path):
  params = {"w": jnp.zeros((3,))}
  saved = {}
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
    for step in range(1, 8):
      params = {"w": params["w"] + 1}
      saved[step] = ckpt.save(step, params=params, force=step == 7)
    # A second forced save of the last step is skipped, not an error.
    assert not ckpt.save(7, params=params, force=True)
  assert saved == {1: False, 2: True, 3: False, 4: True, 5: False, 6: True, 7: True}

  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.all_steps() == [6, 7]
    assert ckpt.latest_step() == 7
    r = ckpt.restore(params={"w": jnp.zeros((3,))})
    np.testing.assert_array_equal(r.params["w"], np.full((3,), 7.0))
    older = ckpt.restore(6, params={"w": jnp.zeros((3,))})
    np.testing.assert_array_equal(older.params["w"], np.full((3,), 6.0))
    with pytest.raises(FileNotFoundError, match="step 2"):
      ckpt.restore(2, params={"w": jnp.zeros((3,))})


def test_restore_keeps_target_named_sharding(tmp_path):
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  saved_sharding = NamedSharding(mesh, P("data", "model"))
  params = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), saved_sharding)}
  key = jax.device_put(jax.random.key(1), NamedSharding(mesh, P()))
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, params=params, rng=key)

  # Concrete target with another sharding, and an abstract target with a sharding.
  other = NamedSharding(mesh, P("model", None))
  concrete = {"w": jax.device_put(jnp.zeros((8, 8)), other)}
  abstract = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=other)}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    for target in (concrete, abstract):
      r = ckpt.restore(params=target, rng=key)
      assert r.params["w"].sharding == other
      assert r.params["w"].sharding.spec == P("model", None)
      np.testing.assert_array_equal(r.params["w"], np.arange(64.0).reshape(8, 8))
      assert r.rng.sharding.spec == P()


def test_mismatched_target_is_refused_with_paths(tmp_path):
  params = {"a": {"w": jnp.zeros((2, 3))}, "b": jnp.zeros((4,)), "c": jnp.zeros((5,), jnp.int32)}
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(3, params=params)
    target = {
      "a": {"w": jnp.zeros((2, 4))},  # Wrong shape.
      "c": jnp.zeros((5,), jnp.float32),  # Wrong dtype.
      "extra": jnp.zeros((1,)),  # Missing in the checkpoint; "b" is unexpected.
    }
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
      ckpt.restore(params=target, opt_state={"mu": jnp.zeros((2,))})
  msg = str(err.value)
  assert "opt_state: missing in checkpoint" in msg
  assert "params/extra: missing in checkpoint" in msg
  assert "params/b: unexpected in checkpoint" in msg
  assert "params/a/w: shape/dtype differ: checkpoint (2, 3) float32, target (2, 4) float32" in msg
  assert "params/c: shape/dtype differ: checkpoint (5,) int32, target (5,) float32" in msg


def test_metadata_round_trip_and_base_model_check(tmp_path):
  meta = {"base_model": "/models/FLUX.1-dev", "config": {"lr": 3e-4, "rank": 32}, "git": "abc"}
  with checkpoint.Checkpointer(tmp_path, metadata=meta) as ckpt:
    ckpt.save(2, params={"w": jnp.ones((2,))})
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.metadata() == meta
    assert ckpt.metadata(2) == meta
    step_dir = ckpt.directory / "2"
  # Plain JSON on disk, readable without orbax or restoring arrays.
  on_disk = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
  assert on_disk["custom_metadata"]["provenance"] == meta

  target = {"w": jnp.zeros((2,))}
  other = {"base_model": "/elsewhere/FLUX.1-schnell"}
  with checkpoint.Checkpointer(tmp_path, metadata=other) as ckpt:
    with pytest.warns(UserWarning, match="FLUX.1-schnell"):
      r = ckpt.restore(params=target)
    assert r.metadata == meta
  with checkpoint.Checkpointer(tmp_path, metadata=other, base_model_mismatch="error") as ckpt:
    with pytest.raises(checkpoint.CheckpointMismatchError, match="FLUX.1-dev"):
      ckpt.restore(params=target)


def test_bad_metadata_and_empty_dir(tmp_path):
  with pytest.raises(TypeError, match="JSON-serializable"):
    checkpoint.Checkpointer(tmp_path, metadata={"x": object()})
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="No finalized checkpoint"):
      ckpt.restore(params={"w": jnp.zeros((2,))})


def test_interrupted_save_keeps_last_finalized_step(tmp_path):
  params = {"w": jnp.arange(3.0)}
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, params=params)
    root = ckpt.directory
  # What a save killed mid-write leaves behind: an unfinalized tmp dir for step 2.
  tmp = root / "2.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(root / "1", tmp)
  (tmp / "params" / "manifest.ocdbt").unlink()

  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.all_steps() == [1]
    np.testing.assert_array_equal(ckpt.restore(params={"w": jnp.zeros(3)}).params["w"], [0, 1, 2])
    # Re-saving the interrupted step works and becomes the latest.
    assert ckpt.save(2, params={"w": jnp.ones(3)})
    assert ckpt.latest_step() == 2
    np.testing.assert_array_equal(ckpt.restore(params={"w": jnp.zeros(3)}).params["w"], [1, 1, 1])


def test_divergence_guard_refuses_to_save_or_resume_huge_weights(tmp_path):
  params = {"w": jnp.ones((4, 4)), "b": jnp.zeros((4,))}
  with checkpoint.Checkpointer(tmp_path, max_abs_param=1e4) as ckpt:
    assert ckpt.save(1, params=params)
    ckpt.wait_until_finished()
    diverged = {"w": jnp.full((4, 4), 3e6), "b": jnp.zeros((4,))}  # Finite, but 3e6.
    with pytest.raises(checkpoint.DivergedError, match=r"step 2 the largest \|weight\| is 3e\+06"):
      ckpt.save(2, params=diverged)
    with pytest.raises(checkpoint.DivergedError, match="last good checkpoint is step 1"):
      ckpt.save(3, params={"w": jnp.full((4, 4), jnp.nan), "b": jnp.zeros((4,))})
    assert ckpt.all_steps() == [1]
  # A checkpoint written without the guard (an older run) is refused on resume.
  with checkpoint.Checkpointer(tmp_path, max_abs_param=None) as ckpt:
    assert ckpt.save(2, params=diverged)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.DivergedError, match=r"checkpoints/2 holds a weight of .*3e\+06"):
      ckpt.restore(2, params=params)
    np.testing.assert_array_equal(ckpt.restore(1, params=params).params["w"], params["w"])


def _damage(folder):
  """Cuts every file of a saved item to half its size, as a full disk or a crash mid-copy does."""
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_falls_back_to_the_newest_checkpoint_that_can_be_read(tmp_path, caplog):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, params=_lora_state(step), rng=jax.random.key(step))
  _damage(tmp_path / "checkpoints" / "3" / "params")

  with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    restored = ckpt.restore(params=_lora_state(0), rng=jax.random.key(0))
    assert restored.step == 2
    _assert_trees_equal(restored.params, _lora_state(2))
    assert "checkpoints/3 cannot be read" in caplog.text
    # Asked for by step, a damaged checkpoint is an error, not a silent substitute.
    with pytest.raises(Exception) as error:
      ckpt.restore(3, params=_lora_state(0))
    assert not isinstance(error.value, checkpoint.CheckpointMismatchError)
    # The resumed run reaches step 3 again: its save replaces the damaged one.
    assert ckpt.save(3, params=_lora_state(33), rng=jax.random.key(3))
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    restored = ckpt.restore(params=_lora_state(0), rng=jax.random.key(0))
    assert restored.step == 3
    _assert_trees_equal(restored.params, _lora_state(33))

  for step in (1, 2, 3):
    _damage(tmp_path / "checkpoints" / str(step) / "params")
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    with pytest.raises(checkpoint.DamagedCheckpointError, match=r"steps \[1, 2, 3\]"):
      ckpt.restore(params=_lora_state(0))


def test_checksums_catch_a_checkpoint_whose_bytes_changed(tmp_path, caplog):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    for step in (1, 2):
      ckpt.save(step, params=_lora_state(step))
  steps = tmp_path / "checkpoints"
  for step in (1, 2):
    assert (steps / str(step) / "checksums.sha256").is_file()
  # One flipped bit in the largest file of step 2's params: a file that still reads.
  victim = max((p for p in (steps / "2" / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x01
  victim.write_bytes(bytes(data))
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    with pytest.raises(checkpoint.DamagedCheckpointError, match=victim.name):
      ckpt.restore(2, params=_lora_state(0))
    restored = ckpt.restore(params=_lora_state(0))
    assert restored.step == 1
    _assert_trees_equal(restored.params, _lora_state(1))
    assert "checkpoints/2 cannot be read" in caplog.text
    # The resumed run's save of step 2 replaces it, with checksums of its own.
    assert ckpt.save(2, params=_lora_state(22))
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    _assert_trees_equal(ckpt.restore(params=_lora_state(0)).params, _lora_state(22))


def test_resume_does_not_skip_a_checkpoint_that_does_not_fit(tmp_path):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    for step in (1, 2):
      ckpt.save(step, params=_lora_state(step))
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CheckpointMismatchError, match="checkpoints/2"):
      ckpt.restore(params={"other": jnp.zeros(3)})


def test_loss_guard_stops_a_loss_that_explodes_against_its_recent_median(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(10, params=_lora_state(0))
    checkpoint.LossGuard(100.0, warmup=1).check(1e6, 1, ckpt, "test")  # Nothing to compare with.
    guard = checkpoint.LossGuard(100.0, window=4, warmup=3)
    # 60.0 is 100 x the median of (0.7, 0.6, 0.5), not beyond it; then the last 4 logged
    # losses are (0.6, 0.5, 60, 0.5), whose median is 0.55.
    for step, loss in enumerate([0.7, 0.6, 0.5, 60.0, 0.5], start=1):
      guard.check(loss, step, ckpt, "test")
    with pytest.raises(checkpoint.DivergedError, match=r"exploded at step 6: 56") as error:
      guard.check(56.0, 6, ckpt, "test")
    assert "median of 0.55" in str(error.value) and "step 10 in" in str(error.value)
    off = checkpoint.LossGuard(0.0, warmup=1)
    for step, loss in enumerate([1.0, 1e9, 1e18]):
      off.check(loss, step, ckpt, "test")


_KILLED_WRITER = """
import sys, numpy as np
from spatial_jax import checkpoint
ckpt = checkpoint.Checkpointer(sys.argv[1], max_to_keep=None)
big = {"w": np.full((4096, 4096), 1.0, np.float32)}  # 64 MB: the write takes a while.
ckpt.save(1, params=big)
ckpt.wait_until_finished()
ckpt.save(2, params={"w": big["w"] * 2})  # Async: returns once the arrays are on the host.
print("writing", flush=True)
ckpt.wait_until_finished()
print("written", flush=True)
"""


def test_kill_during_a_checkpoint_write_leaves_a_resumable_workdir(tmp_path):
  """kill -9 while step 2 is being written: a resume finds step 1 (or a complete step 2), and
  the rerun's save of step 2 succeeds."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  child = subprocess.Popen(
    [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)],
    stdout=subprocess.PIPE,
    text=True,
    env=env,
  )
  assert child.stdout.readline().strip() == "writing"
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=60)
  target = {"w": np.zeros((4096, 4096), np.float32)}
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    restored = ckpt.restore(params=target)
    assert restored.step in (1, 2)
    assert float(restored.params["w"][0, 0]) == restored.step  # Whole, and the right one.
    if restored.step == 1:
      assert ckpt.save(2, params={"w": target["w"] + 2})
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    assert ckpt.latest_step() == 2
    assert float(ckpt.restore(params=target).params["w"][-1, -1]) == 2.0
