"""plan.largest_arrays: the per-device arrays of a partitioned program, largest first."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spatial_jax.jobs import plan


def test_largest_arrays_finds_what_the_mesh_does_not_split():
  mesh = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2])
  x = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))

  def step(x):
    split = jnp.tanh(x) * 2.0  # (512, 512) per device
    whole = jnp.ones((2048, 256)) * x.sum()  # replicated: (2048, 256) on every device
    return split, whole

  text = jax.jit(step).lower(x).compile().as_text()
  arrays = plan.largest_arrays(text, 3)
  assert arrays[0]["shape"] == "f32[2048, 256]" and arrays[0]["gb"] == 2048 * 256 * 4 / 1e9
  assert any(a["shape"] == "f32[512, 512]" for a in arrays), arrays
  assert all(a["op"] for a in arrays)
