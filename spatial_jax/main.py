"""Entry point: `python -m spatial_jax.main --config configs/<exp>.py[:arg] --workdir DIR`.

Intentionally short: flags, multi-process initialisation, then the job named by
`config.job` (see `registry.py`). The jobs are plain `run(config, workdir)`
functions that Colab can call directly.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

# transformers serves tokenizers and configs here, never torch models: its import-time advice
# that PyTorch is missing (the quick start installs no torch) is noise. Set before any import.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file, e.g. configs/data_synthetic.py:smoke.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])

# Environment variables that mean "this process is one of several". Under srun,
# mpirun and TPU pods `jax.distributed.initialize()` configures itself (jax docs);
# elsewhere it needs JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
_MULTIPROCESS_ENV = {
  "SLURM_NTASKS": lambda v: int(v) > 1,
  "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
  "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
  "JAX_COORDINATOR_ADDRESS": bool,
  "SPATIAL_JAX_DISTRIBUTED": lambda v: v not in ("", "0"),
}


def multiprocess_reason(environ=os.environ) -> str | None:
  """Which environment variable says this is a multi-process run, if any."""
  for name, is_multi in _MULTIPROCESS_ENV.items():
    value = environ.get(name)
    if value is not None:
      try:
        if is_multi(value):
          return f"{name}={value}"
      except ValueError:
        continue
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that `--help` and flag errors don't pay for jax.
  import jax

  from spatial_jax import fileio, metrics, registry

  if _CONFIG.value.job == "plan":  # Its fake CPU devices must exist before the backend starts.
    from spatial_jax.jobs import plan

    plan.configure_devices(_CONFIG.value)
  reason = multiprocess_reason()
  if reason:
    logging.info("Multi-process environment (%s): jax.distributed.initialize()", reason)
    # jax reads JAX_COORDINATOR_ADDRESS itself; the count and rank are ours to pass.
    explicit = {
      key: int(os.environ[name])
      for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
      if name in os.environ
    }
    try:
      jax.distributed.initialize(**explicit)
    except (RuntimeError, ValueError) as e:
      raise RuntimeError(
        f"{reason} says this is a multi-process run, but jax.distributed.initialize() could not "
        f"configure itself: {e}. Launch with srun / mpirun / on every TPU worker, or set "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; unset the variable for "
        "a single-process run."
      ) from e
  jax.config.update("jax_threefry_partitionable", True)

  config = _CONFIG.value
  workdir = _WORKDIR.value
  try:
    run = registry.get_job(config.job)  # Fails before anything is written.
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  logging.info(
    "Process %d/%d, %d devices; job %r -> %s",
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
    config.job,
    workdir,
  )
  if jax.process_index() > 0 and os.environ.get("SPATIAL_JAX_LOG_ALL_PROCESSES", "") in ("", "0"):
    # One log for a run: the other processes report warnings and errors only.
    logging.info("Process %d logs warnings and errors only (SPATIAL_JAX_LOG_ALL_PROCESSES=1: all)",
                 jax.process_index())  # fmt: skip
    logging.set_verbosity(logging.WARNING)
  # One run per workdir: process 0 holds its lock for the whole run (the others are that run).
  # Another job's folder is refused before the lock file is made in it.
  lock = fileio.workdir_lock if jax.process_index() == 0 else _no_lock
  try:
    metrics.check_workdir_owner(os.path.join(workdir, "config.json"), config.job)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  try:
    with lock(workdir, config.job):
      if jax.process_index() == 0:
        try:  # Refuses a workdir that holds another job's record (a model folder, say).
          metrics.write_config_json(workdir, config)
        except ValueError as e:
          raise app.UsageError(str(e)) from e
      run(config, workdir)
  except fileio.WorkdirBusyError as e:
    raise app.UsageError(str(e)) from e
  except Exception as e:  # noqa: BLE001 - every failure of a job ends the same way.
    _fail(config.job, e)


def _fail(job: str, error: Exception) -> None:
  """Ends a failed job: the traceback goes to the log, and the cause is the last thing printed.

  The jobs' own `finally` blocks have run by now (checkpoints finished, event files flushed), so
  the process exits at once: a normal interpreter shutdown would stop orbax's and asyncio's
  threads mid-flight and print hundreds of lines of their tracebacks after the cause.
  """
  logging.exception("Job %r failed", job)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(f"FATAL {job} failed: {type(error).__name__}: {error}\n")
  sys.stderr.flush()
  os._exit(1)


@contextlib.contextmanager
def _no_lock(workdir: str, job: str):
  del workdir, job
  yield


def _override_error(argv: list[str]) -> str | None:
  """For a `--config.a.b=v` override whose key the config lacks: which, and the valid keys."""
  from spatial_jax import configs_lib

  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  if path is None:
    return None
  file, _, arg = path.partition(":")
  config = configs_lib.load_config(file, arg or None)
  for flag in argv:
    if not flag.startswith("--config."):
      continue
    node, keys = config, flag.split("=", 1)[0].removeprefix("--config.").split(".")
    for depth, key in enumerate(keys):
      if not hasattr(node, "keys") or key not in node:
        where = ".".join(["config", *keys[:depth]])
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        return f"{flag.split('=', 1)[0]}: {where} has no key {key!r}; its keys: {valid}"
      node = node[key]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a misspelled config key ends the run with one line naming it and the
  valid keys (ml_collections raises an AttributeError, which absl would print as a traceback)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    try:
      message = _override_error(argv)
    except Exception:  # noqa: BLE001  The plain error below is still an answer.
      message = None
    hint = re.search(r"Did you mean \S+", str(e))  # ml_collections' nearest key.
    if message and hint:
      message += f". {hint.group(0).replace(chr(34), '')}?"
    sys.stderr.write(f"FATAL Flags parsing error: {message or e}\n")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
