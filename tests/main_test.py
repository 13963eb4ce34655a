"""The command line: a smoke run, config.json, and clear errors for bad input."""

import json
import os
import subprocess
import sys
import time

import pytest

from spatial_jax.data import pairs

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=240):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "spatial_jax.main", *args],
    cwd=_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_smoke_run_writes_pairs_folder_and_resolved_config(tmp_path):
  workdir = tmp_path / "d"
  result = _main(
    "--config=configs/data_synthetic.py:smoke",
    f"--workdir={workdir}",
    "--config.num_train=10",
    "--config.num_test=4",
    "--config.image_size=48",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.loads((workdir / "config.json").read_text())
  assert (config["job"], config["num_train"], config["image_size"]) == ("data_synthetic", 10, 48)
  records = pairs.read_pairs(workdir)
  assert [r.split for r in records].count("test") == 4 and len(records) == 14
  stats = json.loads((workdir / "stats.json").read_text())
  assert stats["num_pairs"] == 14 and stats["oracle"]["chosen_all_satisfied"] == 1.0
  assert (workdir / "gallery.png").stat().st_size > 0


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config=configs/data_synthetic.py:smoke", "--config.job=nope"], "Unknown job 'nope'"),
    (["--config=configs/data_synthetic.py:smok"], "Unknown config arg 'smok'"),
    (["--config=configs/no_such_config.py"], "no_such_config.py"),
  ],
)
def test_bad_job_or_config_is_a_clear_error(tmp_path, args, message):
  result = _main(*args, f"--workdir={tmp_path / 'x'}")
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "x").exists()


def test_another_jobs_workdir_is_refused_before_anything_is_written(tmp_path):
  # A model folder given as --workdir of another job keeps its record (it is what loads it).
  workdir = tmp_path / "pairs"
  workdir.mkdir()
  record = json.dumps({"job": "reward_train", "seed": 3})
  (workdir / "config.json").write_text(record)
  result = _main("--config=configs/data_synthetic.py:smoke", f"--workdir={workdir}")
  assert result.returncode != 0
  assert "holds a 'reward_train' run" in result.stderr
  assert "'data_synthetic' run" in result.stderr
  assert (workdir / "config.json").read_text() == record
  assert os.listdir(workdir) == ["config.json"]


@pytest.mark.slow
def test_two_runs_on_one_workdir_one_refuses_naming_the_other(tmp_path):
  # A lone run, then two at once on another workdir: the second refuses within seconds, naming
  # the first, which ends as the lone run did.
  args = ["--config=configs/sample.py:smoke"]
  lone = _main(*args, f"--workdir={tmp_path / 'lone'}")
  assert lone.returncode == 0, lone.stderr[-3000:]
  workdir = tmp_path / "shared"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  first = subprocess.Popen(
    [sys.executable, "-m", "spatial_jax.main", *args, f"--workdir={workdir}"],
    cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  lock = workdir / ".lock"
  for _ in range(600):
    if lock.exists() and lock.read_text():
      break
    time.sleep(0.1)
  second = _main(*args, f"--workdir={workdir}", timeout=120)
  _, first_err = first.communicate(timeout=240)
  assert first.returncode == 0, first_err[-3000:]
  assert second.returncode != 0
  last = second.stderr.strip().splitlines()[-1]
  assert "is in use by another run" in last and f'"pid": {first.pid}' in last, last
  assert (
    json.loads((workdir / "metrics.json").read_text())["oracle"]
    == json.loads((tmp_path / "lone" / "metrics.json").read_text())["oracle"]
  )
  images = sorted(os.listdir(workdir / "images"))
  assert images == sorted(os.listdir(tmp_path / "lone" / "images"))
  for name in images:
    assert (workdir / "images" / name).read_bytes() == (
      tmp_path / "lone" / "images" / name
    ).read_bytes()


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.nump_prompts=3", "config has no key 'nump_prompts'; its keys: ['batch_size',"),
    (
      "--config.sampling.num_step=3",
      "config.sampling has no key 'num_step'; its keys: ['cfg_scale'",
    ),
  ],
)
def test_misspelled_config_key_is_one_line_with_the_valid_keys(tmp_path, override, message):
  result = _main("--config=configs/sample.py:smoke", f"--workdir={tmp_path / 'w'}", override)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("FATAL Flags parsing error: " + override.split("=")[0]) and message in last
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()


def test_a_failed_job_ends_with_its_cause_on_the_last_line(tmp_path):
  missing = tmp_path / "no_model"
  result = _main(
    "--config=configs/reward_eval.py:smoke",
    f"--workdir={tmp_path / 'eval'}",
    f"--config.model_path={missing}",
  )
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("FATAL reward_eval failed: ValueError: ") and str(missing) in last
  assert "Traceback" in result.stderr  # The whole story is in the log, above the cause.


# `python -m spatial_jax.main` whose files cannot grow beyond argv[1] bytes: writes past it fail
# with EFBIG, as they fail with ENOSPC on a full disk (SIGXFSZ ignored, so the write returns the
# error instead of killing the process). Set in the child itself: no fork of this threaded process.
_SIZE_LIMITED_MAIN = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
runpy.run_module("spatial_jax.main", run_name="__main__", alter_sys=True)
"""


def _tree_digest(folder):
  import hashlib  # noqa: PLC0415

  digest = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return digest


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_ends_clearly_and_resumes(tmp_path):
  workdir = tmp_path / "reward"
  args = ("--config=configs/reward_synthetic.py:smoke", f"--workdir={workdir}")
  first = _main(*args, "--config.train.steps=2")
  assert first.returncode == 0, first.stderr[-2000:]
  step2 = _tree_digest(workdir / "checkpoints" / "2")
  pairs_before = _tree_digest(workdir / "pairs")
  # The next checkpoint's arrays cannot be written: the run stops with the cause on its last
  # line, and what was written before (step 2, the pairs) is unchanged.
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  full = subprocess.run(
    [sys.executable, "-c", _SIZE_LIMITED_MAIN, str(64 * 1024), *args, "--config.train.steps=4"],
    cwd=_ROOT, env=env, capture_output=True, text=True, timeout=240,
  )  # fmt: skip
  assert full.returncode != 0
  last = full.stderr.strip().splitlines()[-1]
  assert last.startswith("FATAL reward_train failed: "), full.stderr[-3000:]
  assert "File too large" in last or "No space left" in last, last
  assert _tree_digest(workdir / "checkpoints" / "2") == step2
  assert _tree_digest(workdir / "pairs") == pairs_before
  # With room again the same command resumes from step 2 and ends as a lone 4-step run.
  resumed = _main(*args, "--config.train.steps=4")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resumed from step 2" in resumed.stderr
  lone = _main("--config=configs/reward_synthetic.py:smoke", f"--workdir={tmp_path / 'lone'}",
               "--config.train.steps=4")  # fmt: skip
  assert lone.returncode == 0
  ours, theirs = (
    json.loads((w / "summary.json").read_text()) for w in (workdir, tmp_path / "lone")
  )
  assert ours["step"] == theirs["step"] == 4
  assert ours["eval"] == theirs["eval"]
