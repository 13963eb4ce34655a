"""Test setup: 8 fake CPU devices, configured before anything imports jax."""

import os

# Must run before the JAX backend starts (jax_style.md, pitfall 8).
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Keep TensorFlow (pulled in by clu / tfds) off the fake devices' threads.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
