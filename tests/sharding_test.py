"""Mesh construction, rule resolution, activation constraints, born-sharded init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from spatial_jax import sharding


def _linear(din, dout, names, rngs):
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
  return nnx.Linear(din, dout, kernel_init=init, rngs=rngs)


class _Mlp(nnx.Module):
  def __init__(self, rngs):
    self.up = _linear(16, 32, ("embed", "mlp"), rngs)
    self.down = _linear(32, 16, ("mlp", "embed"), rngs)

  def __call__(self, x):
    h = sharding.shard(jax.nn.gelu(self.up(x)), ("act_batch", "act_mlp"))
    return sharding.shard(self.down(h), ("act_batch", "act_embed"))


def test_make_mesh_resolves_minus_one_and_uses_auto_axes():
  mesh = sharding.make_mesh([("data", -1), ("tensor", 2)])
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize(
  "spec, message",
  [
    ([("data", 3)], "needs 3 devices"),
    ([("data", -1), ("fsdp", -1)], "At most one"),
    ([("model", 8)], "Unknown mesh axis 'model'"),
    ([("data", -1), ("tensor", 3)], "not divisible"),
  ],
)
def test_make_mesh_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(spec)


def test_rules_validate_names_and_axes():
  rules = dict(sharding.resolve_rules([("mlp", None), ("act_batch", ["data"])]))
  assert rules["mlp"] is None and rules["act_batch"] == ("data",)
  assert rules["embed"] == "fsdp"  # default kept
  with pytest.raises(ValueError, match="Unknown logical axis 'emb'"):
    sharding.resolve_rules([("emb", "fsdp")])
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.resolve_rules([("embed", "model")])


def test_logical_to_spec_uses_each_mesh_axis_once():
  rules = sharding.resolve_rules(None)
  assert sharding.logical_to_spec(("act_batch", "act_seq", "act_embed"), rules) == PartitionSpec(
    ("data", "fsdp"), None, None
  )
  # heads and mlp both map to tensor: only the first dimension takes it.
  assert sharding.logical_to_spec(("heads", "mlp"), rules) == PartitionSpec("tensor", None)
  with pytest.raises(ValueError, match="Unknown logical axis"):
    sharding.logical_to_spec(("batch",), rules)


def test_shard_constrains_activations_and_is_identity_without_mesh():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.resolve_rules(None)
  x = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
  with sharding.use_mesh(mesh, rules):
    y = jax.jit(lambda x: sharding.shard(x * 2, ("act_batch", "act_mlp")))(x)
  assert y.sharding.spec == PartitionSpec(("data", "fsdp"), "tensor")
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
  assert sharding.shard(x, ("act_batch", None)) is x
  with pytest.raises(ValueError, match="rank 2"):
    sharding.shard(x, ("act_batch",))


class _Attn(nnx.Module):
  def __init__(self, rngs):
    self.proj = _linear(8, 8, ("heads", "mlp"), rngs)


def test_create_sharded_never_puts_one_mesh_axis_on_two_dims():
  mesh = sharding.make_mesh([("data", 4), ("tensor", 2)])
  model = sharding.create_sharded(lambda: _Attn(nnx.Rngs(0)), mesh, sharding.resolve_rules(None))
  assert model.proj.kernel[...].sharding.spec == PartitionSpec("tensor", None)


def test_create_sharded_gives_named_shardings_and_same_values_as_unsharded():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.resolve_rules(None)
  model = sharding.create_sharded(lambda: _Mlp(nnx.Rngs(3)), mesh, rules)
  assert model.up.kernel[...].sharding.spec == PartitionSpec("fsdp", "tensor")
  assert model.down.kernel[...].sharding.spec == PartitionSpec("tensor", "fsdp")
  assert model.up.bias[...].sharding.spec == PartitionSpec()
  # Each device holds a quarter of the kernel: it was never materialised whole.
  shard_shapes = {s.data.shape for s in model.up.kernel[...].addressable_shards}
  assert shard_shapes == {(8, 16)}
  with nnx.use_eager_sharding(False):
    reference = _Mlp(nnx.Rngs(3))
  np.testing.assert_allclose(
    np.asarray(model.up.kernel[...]), np.asarray(reference.up.kernel[...]), rtol=0, atol=0
  )
  x = jnp.ones((8, 16))
  with sharding.use_mesh(mesh, rules):
    xs = jax.device_put(x, sharding.data_sharding(mesh, rules, 2))
    y = jax.jit(lambda m, x: m(x))(model, xs)
  assert y.sharding.spec == PartitionSpec(("data", "fsdp"))
  np.testing.assert_allclose(np.asarray(y), np.asarray(reference(x)), rtol=1e-5, atol=1e-5)


def test_state_shardings_follow_rule_overrides():
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 8), ("tensor", 1)])
  rules = sharding.resolve_rules([("mlp", "fsdp"), ("embed", None)])
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: _Mlp(nnx.Rngs(0)))
  specs = sharding.state_shardings(nnx.state(abstract), mesh, rules)
  assert specs["up"]["kernel"].spec == PartitionSpec(None, "fsdp")
  assert specs["down"]["kernel"].spec == PartitionSpec("fsdp", None)


def test_take_gathers_rows_into_the_given_sharding():
  mesh = sharding.make_mesh([("data", 4), ("tensor", 2)])
  rules = sharding.resolve_rules(None)
  x = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3, 8, 5)
  split = sharding.named_sharding(mesh, (None, "act_batch", None), rules)
  on_mesh = jax.device_put(x, split)
  rows = np.array([7, 0, 3, 3])
  got = sharding.take(on_mesh, rows, 1, split)
  assert got.sharding == split
  np.testing.assert_array_equal(np.asarray(got), x[:, rows])


def test_one_process_scores_every_row():
  mesh = sharding.make_mesh([("data", -1)])
  rules = sharding.resolve_rules(None)
  assert sharding.process_rows(10, mesh, rules) is None
  local = np.arange(10.0)
  np.testing.assert_array_equal(sharding.gather_rows(local, None, 10), local)
