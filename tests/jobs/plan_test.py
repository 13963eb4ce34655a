"""The `plan` job on tiny models: a table of positive memory and FLOPs, and no weights made."""

import importlib.util
import json
import os

import jax
import pytest

from spatial_jax import configs_lib
from spatial_jax.jobs import plan

pytestmark = pytest.mark.slow  # End to end: compiles full steps of every plan row.


def test_tiny_plan_reports_every_row_without_allocating_weights(tmp_path):
  config = configs_lib.load_config("configs/plan.py", "tiny")
  config.fail_fast = True
  live_before = {id(x) for x in jax.live_arrays()}

  results = plan.run(config, str(tmp_path))

  # Nothing as large as a model was materialised: only tiny constants (schedules, rng keys).
  new = [x for x in jax.live_arrays() if id(x) not in live_before]
  new_bytes = sum(x.nbytes for x in new)
  smallest_model = min(r["param_bytes"] for r in results)
  assert smallest_model > 100_000
  assert new_bytes < smallest_model / 10, [(x.shape, x.dtype) for x in new]

  steps = ["reward_train", "grpo_rollout", "grpo_train", "grpo_resident"]
  assert [r["step"] for r in results] == steps
  for r in results:
    assert "error" not in r, r
    assert r["argument_gb"] > 0 and r["temp_gb"] > 0, r
    # The arguments hold at least this device's shard of the parameters.
    assert r["argument_gb"] * 1e9 >= r["param_bytes"] / r["devices"], r
    assert r["total_gb"] >= r["argument_gb"] - r["alias_gb"], r
    assert r["tflops_per_device"] > 0, r
    assert r["trainable_params"] > 0 and r["frozen_params"] > r["trainable_params"], r
  # FSDP over 2 devices: each holds about half of the rollout's weights.
  rollout = results[1]
  assert rollout["argument_gb"] * 1e9 < 0.75 * rollout["param_bytes"], rollout
  # A device count a target does not have gives "-", not a verdict.
  by_devices = {r["devices"]: r["fits"] for r in results}
  assert by_devices[2] == {"H20": None, "H100": None, "v5p": None, "4x8 H20": None}
  # The resident set holds the policy, its Adam state, the encoders, the VAE and SpatialScore,
  # all as arguments of the reward call (the check above: at least its shard of all of them).
  resident = results[3]
  assert resident["param_bytes"] > rollout["param_bytes"] + results[0]["param_bytes"], resident
  assert resident["argument_gb"] > rollout["argument_gb"], resident

  saved = json.loads((tmp_path / "plan.json").read_text())
  assert [r["name"] for r in saved["rows"]] == [r["name"] for r in results]
  markdown = (tmp_path / "plan.md").read_text()
  assert "total GB" in markdown and all(r["name"] in markdown for r in results)


def test_unknown_plan_names_the_known_ones():
  with pytest.raises(ValueError, match="known plans: \\['flux_dev_grpo', 'reward_7b', 'tiny'\\]"):
    configs_lib.load_config("configs/plan.py", "reward_8b")


def test_misspelled_override_fails(tmp_path):
  config = configs_lib.load_config("configs/plan.py", "tiny,only=rollout")
  config.rows[0]["set"] = [["grpo.group_sise", 4]]
  config.fail_fast = True
  with pytest.raises(AttributeError, match="group_sise"):
    plan.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "plan.json")


def test_tpu_target_compiles_without_tpus_or_names_the_cure():
  """`config.target="tpu:v5p"`: v5p topologies by chip count, described by libtpu without TPUs."""
  with pytest.raises(ValueError, match="no topology of 3 chips"):
    plan.target_devices("tpu:v5p", 3)
  with pytest.raises(ValueError, match="Unknown plan target 'gpu'"):
    plan.target_devices("gpu", 8)
  if importlib.util.find_spec("libtpu") is None:
    with pytest.raises(RuntimeError, match=r"needs libtpu \(pip install 'jax\[tpu\]'\)"):
      plan.target_devices("tpu:v5p", 4)
  else:
    devices = plan.target_devices("tpu:v5p", 4)
    assert len(devices) == 4 and "TPU" in devices[0].device_kind
