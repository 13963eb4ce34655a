"""The launchers parse, and fail early with messages that say what is wrong."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
CONFIG = "configs/reward_synthetic.py:smoke"


def _run(script, *args, env=None):
  # No SLURM_* from a CI runner's own environment; PATH kept minimal (no srun, no gcloud).
  base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  base["PATH"] = "/usr/bin:/bin"
  return subprocess.run(
    ["bash", script, *args],
    cwd=ROOT,
    env={**base, **(env or {})},
    capture_output=True,
    text=True,
    timeout=30,
  )


@pytest.mark.parametrize("script", [SLURM, TPU])
def test_scripts_parse(script):
  assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0


def test_slurm_script_refuses_to_run_outside_slurm(tmp_path):
  r = _run(SLURM, CONFIG, str(tmp_path / "w"))
  assert r.returncode == 1
  assert "not inside a SLURM job (SLURM_JOB_ID is unset)" in r.stderr
  assert not (tmp_path / "w").exists()  # Nothing is created before the checks pass.


def test_slurm_script_names_what_is_missing(tmp_path):
  r = _run(SLURM, env={"SLURM_JOB_ID": "1"})
  assert r.returncode == 1 and "usage: sbatch" in r.stderr
  r = _run(SLURM, CONFIG, str(tmp_path), env={"SLURM_JOB_ID": "1"})
  assert r.returncode == 1 and "srun is not on PATH" in r.stderr
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
  (bin_dir / "srun").chmod(0o755)
  env = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "PATH": f"{bin_dir}:/usr/bin:/bin"}
  env["PYTHON"] = os.path.join(ROOT, ".venv", "bin", "python")
  if not os.path.exists(env["PYTHON"]):
    env["PYTHON"] = "python3"
  r = _run(SLURM, "configs/no_such_config.py", str(tmp_path), env=env)
  assert r.returncode == 1 and "config file configs/no_such_config.py not found" in r.stderr


def test_tpu_launcher_runs_the_same_command_on_every_worker():
  r = _run(TPU, "--dry-run", "my-pod", "us-east5-a", CONFIG, "/mnt/gcs/run", "--config.seed=1")
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("gcloud compute tpus tpu-vm ssh my-pod --zone us-east5-a --worker=all")
  assert "SPATIAL_JAX_DISTRIBUTED=1" in r.stdout and "-m\\ spatial_jax.main" in r.stdout
  assert "configs/reward_synthetic.py:smoke" in r.stdout and "--config.seed=1" in r.stdout
  r = _run(TPU, "my-pod", "us-east5-a")
  assert r.returncode == 2 and "usage: launch/tpu_pod.sh" in r.stderr
  r = _run(TPU, "my-pod", "us-east5-a", "configs/nope.py", "/mnt/gcs/r")
  assert r.returncode == 1 and "config file configs/nope.py not found" in r.stderr
  r = _run(TPU, "my-pod", "us-east5-a", CONFIG, "gs://bucket/run")
  assert r.returncode == 1 and "gs:// URLs are not supported" in r.stderr
