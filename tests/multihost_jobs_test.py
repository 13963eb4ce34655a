"""Jobs run as several processes (`main.py` + jax.distributed, CPU, loopback) end as one process.

Each run below starts `python -m spatial_jax.main` for a smoke config: as two processes of 4 CPU
devices joined through a coordinator on 127.0.0.1, and as one process of 8 devices (the same
mesh and global batches). The two must write the same summary and the same weights. A killed
process must take the other down within a bounded time, and the rerun must resume to the same
end as an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time

import multihost_util
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow  # End to end: several processes through jax.distributed.

TIMEOUT_S = 480  # The backstop for a hang; a run takes ~1-2 minutes on a loaded 2-core runner.
# A dead peer must stop the others within this (jax's heartbeat timeout is set below it).
DEAD_PEER_S = 120
GRPO = ["configs/grpo_synthetic.py:smoke", "--config.train.steps=4"]


def _main(config: list[str], workdir: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "spatial_jax.main",
    f"--config={config[0]}",
    *config[1:],
    f"--workdir={workdir}",
  ]


def _two_processes(config, workdir, port):
  return {
    f"p{i}": (_main(config, workdir), multihost_util.distributed_env(4, i, 2, port))
    for i in range(2)
  }


def _run(commands, log_dir):
  failures = multihost_util.wait(multihost_util.start(commands, log_dir), log_dir, TIMEOUT_S)
  if failures:
    pytest.fail("\n".join(failures.values()), pytrace=False)


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def _numbers(tree, prefix=""):
  """The summary's numbers by path (what a run reports; its wall time and paths aside)."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      if k not in ("train_seconds", "final"):
        out.update(_numbers(v, f"{prefix}{k}/"))
    return out
  return {prefix.rstrip("/"): tree} if isinstance(tree, int | float) else {}


def _assert_same_end(got_dir, ref_dir, weights, near_zero_atol=1e-5):
  """The same summary numbers (within 1e-3) and weights. Weights that are still near their zero
  init (every |w| < 1e-3: FLUX's AdaLN modulation, whose gradients start as rounding noise) are
  compared within `near_zero_atol`."""
  got, ref = _numbers(_summary(got_dir)), _numbers(_summary(ref_dir))
  assert set(got) == set(ref) and len(ref) > 2
  for name, value in ref.items():
    assert got[name] == pytest.approx(value, abs=1e-3), name
  ref_w = load_file(os.path.join(ref_dir, weights))
  got_w = load_file(os.path.join(got_dir, weights))
  assert set(got_w) == set(ref_w) and ref_w
  for name, value in ref_w.items():
    atol = near_zero_atol if np.abs(value).max() < 1e-3 else 1e-5
    np.testing.assert_allclose(got_w[name], value, rtol=1e-4, atol=atol, err_msg=name)
  return ref_w


def _one_and_two(config, out):
  """The config as one process of 8 devices (`one/`) and two of 4 (`two/`), all at once."""
  commands = {"one": (_main(config, str(out / "one")), multihost_util.cpu_env(8))}
  commands.update(_two_processes(config, str(out / "two"), multihost_util.free_port()))
  start = time.time()
  _run(commands, str(out))
  print(f"{config[0]}, 1 and 2 processes at once: {time.time() - start:.1f} s")


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost_grpo")
  _one_and_two(GRPO, out)
  return out


def test_grpo_two_processes_match_one(grpo_runs):
  lora = _assert_same_end(
    str(grpo_runs / "two"), str(grpo_runs / "one"), "final/lora/pytorch_lora_weights.safetensors"
  )
  # The LoRA moved (its B factors start at zero), so equal weights mean equal updates.
  assert max(float(np.abs(v).max()) for k, v in lora.items() if "lora_B" in k) > 0
  # One writer: process 1 logged only (no second event file), and warnings and errors only.
  events = [f for f in os.listdir(grpo_runs / "two") if f.startswith("events.out")]
  assert len(events) == 1
  logs = [(grpo_runs / f"p{i}.log").read_text() for i in range(2)]
  assert "Final:" in logs[0] and "Final:" not in logs[1]
  assert "Process 1 logs warnings and errors only" in logs[1]


def test_flux_sft_two_processes_match_one(tmp_path):
  # Adam's eps raised: weights whose gradient is ~0 otherwise move by lr * sign(rounding noise),
  # and 8 devices in one process and 2 x 4 over gloo reduce in different orders (their losses
  # agree to 1e-6 while such weights differ by ~lr). With it, every weight agrees to ~1e-8 but
  # the zero-init modulation's (values ~1e-4, differences up to ~5e-5: noise-led gradients).
  _one_and_two(["configs/flux_sft_synthetic.py:smoke", "--config.train.adam_eps=1e-3"], tmp_path)
  _assert_same_end(
    str(tmp_path / "two"),
    str(tmp_path / "one"),
    "final/transformer/diffusion_pytorch_model.safetensors",
    near_zero_atol=1e-4,
  )
  # The same losses step by step (the same batches: each process read its block of each).
  losses = [json.load(open(tmp_path / r / "history.json"))["train/loss"] for r in ("one", "two")]
  assert len(losses[0]) == 4
  np.testing.assert_allclose(np.array(losses[1])[:, 1], np.array(losses[0])[:, 1], rtol=1e-5)


def test_grpo_dead_process_stops_the_other_and_the_rerun_resumes(grpo_runs, tmp_path):
  workdir, logs = str(tmp_path / "run"), str(tmp_path / "killed")
  os.makedirs(logs)
  procs = multihost_util.start(_two_processes(GRPO, workdir, multihost_util.free_port()), logs)
  first = os.path.join(workdir, "checkpoints", "1", "commit_success.txt")
  deadline = time.time() + TIMEOUT_S
  while not os.path.exists(first) and time.time() < deadline:
    if any(p.poll() is not None for p in procs.values()):
      break
    time.sleep(0.1)
  assert os.path.exists(first), multihost_util.output_tail(os.path.join(logs, "p0.log"))
  assert procs["p0"].poll() is None, "the run ended before a process could be killed"
  procs["p1"].send_signal(signal.SIGKILL)
  killed = time.time()
  try:
    rc = procs["p0"].wait(timeout=DEAD_PEER_S)
  except Exception:
    procs["p0"].kill()
    procs["p0"].wait()
    pytest.fail(f"process 0 still ran {DEAD_PEER_S} s after process 1 died")
  print(f"process 0 exited {rc} {time.time() - killed:.1f} s after process 1 was killed")
  assert rc != 0
  assert not os.path.exists(os.path.join(workdir, "summary.json"))

  os.makedirs(tmp_path / "rerun")
  _run(_two_processes(GRPO, workdir, multihost_util.free_port()), str(tmp_path / "rerun"))
  _assert_same_end(workdir, str(grpo_runs / "two"), "final/lora/pytorch_lora_weights.safetensors")


def test_text_encoder_two_processes_match_one(tmp_path):
  _one_and_two(["configs/text_encoder_synthetic.py:smoke"], tmp_path)
  _assert_same_end(str(tmp_path / "two"), str(tmp_path / "one"), "final/model.safetensors")


def _files(folder):
  """Relative path -> bytes of every file under `folder` but the run's records and timings."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      if name not in ("config.json", "stats.json", "metrics.json", "review.html"):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          out[os.path.relpath(path, folder)] = f.read()
  return out


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
  if isinstance(tree, list):
    return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}/").items()}
  return {prefix.rstrip("/"): tree}


def _assert_same_values(got, ref, what):
  """The same keys; numbers within 1e-3 (timings aside), everything else equal."""
  got, ref = _flat(got), _flat(ref)
  assert set(got) == set(ref), what
  for key, value in ref.items():
    if "seconds" in key or "by_this_run" in key:  # Timings; what a resumed run added.
      continue
    if isinstance(value, float):
      assert got[key] == pytest.approx(value, abs=1e-3), f"{what}: {key}"
    else:
      assert got[key] == value, f"{what}: {key}"


@pytest.mark.parametrize(
  "config, record, resumed",
  [
    (["configs/sample.py:smoke"], "metrics.json", False),
    (["configs/pairs_flux.py:smoke"], "stats.json", True),
  ],
  ids=["sample", "pairs_generate"],
)
def test_outputs_of_two_processes_match_one(tmp_path, config, record, resumed):
  if resumed:  # Two processes make the first half, then the command continues the folder.
    os.makedirs(tmp_path / "half")
    half = config + ["--config.num_prompts=8"]
    _run(
      _two_processes(half, str(tmp_path / "two"), multihost_util.free_port()),
      str(tmp_path / "half"),
    )
    assert len(open(tmp_path / "two" / "perturbations.jsonl").readlines()) == 8
  _one_and_two(config, tmp_path)
  one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
  assert sorted(two) == sorted(one) and any(name.endswith(".png") for name in one)
  for name, data in one.items():
    if name.endswith(".png"):  # Pixels within one level (the reductions' rounding differs).
      a = np.asarray(Image.open(io.BytesIO(data)), np.int16)
      b = np.asarray(Image.open(io.BytesIO(two[name])), np.int16)
      assert a.shape == b.shape and np.abs(a - b).max() <= 1, name
    elif name.endswith(".jsonl"):  # Pairs, perturbations, samples: the same rows.
      rows = [[json.loads(line) for line in d.decode().splitlines()] for d in (data, two[name])]
      assert rows[0], name
      _assert_same_values(rows[1], rows[0], name)
  records = [json.load(open(tmp_path / r / record)) for r in ("two", "one")]
  _assert_same_values(*records, record)
