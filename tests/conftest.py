"""Test setup: 8 fake CPU devices, configured before anything imports jax."""

import os

# Must run before the JAX backend starts (jax_style.md, pitfall 8).
# The 8 devices run a collective as 8 threads that meet at a rendezvous; XLA ends the process
# when one arrives later than its termination timeout ("Termination timeout ... exceeded. Exiting
# to ensure a consistent program state."), which a 2-core machine running other jobs beside the
# suite can cause (an abort in a sharded test). Ten minutes: a stuck collective still ends it.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8"
  + " --xla_cpu_collective_timeout_seconds=600"
  + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Keep TensorFlow (if tfds finds it installed) off the fake devices' threads.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session", autouse=True)
def xla_cache(tmp_path_factory):
  """A persistent XLA cache for the whole run: many tests compile the same tiny programs (the
  smoke runs' steps, samplers and initialisers, again in resumes and in the quickstart), and
  read them back instead of compiling them again (~10 s each)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  before = {name: getattr(jax.config, name) for name in names}
  values = (str(tmp_path_factory.mktemp("xla_cache")), 0.0, 0)
  for name, value in zip(names, values, strict=True):
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # The cache is set up once per process; start it anew.
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
