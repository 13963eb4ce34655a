"""Running processes of a multi-process (jax.distributed, CPU, loopback) run from tests.

`multiprocess_test.py` and `multihost_jobs_test.py` start several Python processes at once, each
with its own count of CPU devices, joined through a coordinator on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(num_devices: int, **extra: str) -> dict[str, str]:
  """The environment of one process with `num_devices` CPU devices, and `extra` variables."""
  env = dict(os.environ)
  # The test process's own flags (conftest: 8 devices) must not leak into the workers.
  # Backend optimisation off: the programs are tiny, compiling them is most of the test's time,
  # and both sides of a comparison compile the same way.
  env["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={num_devices} --xla_backend_optimization_level=0"
  )
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  launcher = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  for name in list(env):  # jax.distributed must not auto-detect a cluster around the test.
    if name.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "SPATIAL_JAX_")) or name in launcher:
      env.pop(name)
  env.update(extra)
  return env


def distributed_env(num_devices: int, process_id: int, num_processes: int, port: int):
  """`cpu_env` for process `process_id` of a run that `main.py` joins through jax.distributed."""
  return cpu_env(
    num_devices,
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_NUM_PROCESSES=str(num_processes),
    JAX_PROCESS_ID=str(process_id),
  )


def output_tail(path: str, lines: int = 40) -> str:
  with open(path, errors="replace") as f:
    text = [line for line in f if not line.startswith("[Gloo]")]
  return "".join(text[-lines:])


def start(
  commands: Mapping[str, tuple[Sequence[str], Mapping[str, str]]], log_dir: str
) -> dict[str, subprocess.Popen]:
  """Starts every (argv, env) at once, output in `<log_dir>/<name>.log`."""
  procs = {}
  for name, (argv, env) in commands.items():
    with open(os.path.join(log_dir, f"{name}.log"), "w") as log:
      procs[name] = subprocess.Popen(
        list(argv), cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT
      )
  return procs


def wait(procs: Mapping[str, subprocess.Popen], log_dir: str, timeout_s: float) -> dict[str, str]:
  """Waits for every process (killing what is left after `timeout_s`); name -> a failure
  description, for those that did not exit 0."""
  deadline = time.time() + timeout_s
  failures = {}
  for name, proc in procs.items():
    try:
      rc = proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      rc = f"killed after {timeout_s} s"
    if rc != 0:
      log = os.path.join(log_dir, f"{name}.log")
      failures[name] = f"--- {name}: exit {rc}; its output ends:\n{output_tail(log)}"
  return failures
