"""Job `reproduce` at smoke size: every table and row of the report, resume, bad config."""

import json
import os

import pytest

from spatial_jax.configs_lib import load_config
from spatial_jax.jobs import reproduce, reproduce_report

pytestmark = pytest.mark.slow  # Every stage of the quickstart and nine more runs.


def test_smoke_writes_every_table_and_row_and_a_rerun_skips_every_run(tmp_path):
  config = load_config("configs/reproduce_synthetic.py", "smoke")
  results = reproduce.run(config, str(tmp_path))
  report = (tmp_path / "report.md").read_text()
  for heading in ("## Claims", "## Reward accuracy", "## GRPO on held-out", "## Top-k at G = 12"):
    assert heading in report
  for _, label in reproduce_report.REWARD_ROWS:
    assert f"| {label} |" in report
  for label in ("| base |", "| GRPO with SpatialScore |", "| Flow-GRPO* (oracle on short"):
    assert label in report
  for name in config.topk.runs:
    assert f"| {name} |" in report
    assert results["topk"][name]["train_nfe_per_step"] > 0
  # k = 6 of G = 12 trains every sample, k = 4 two thirds of them.
  assert results["topk"]["k4"]["train_nfe_per_step"] == pytest.approx(
    results["topk"]["k6"]["train_nfe_per_step"] * 2 / 3
  )
  rewards = results["rewards"]
  assert rewards["oracle"]["0"]["accuracy"] == 1.0
  assert set(rewards) == {key for key, _ in reproduce_report.REWARD_ROWS}
  for name in rewards:
    assert rewards[name]["0"]["count"] == config.eval_pairs.num_test
  changes = results["eval_pairs"]["num_changes"]
  assert set(changes) >= {"1", "2"}, changes
  grpo = results["grpo"]["0"]
  for run in ("spatial_score", "flow_grpo"):
    assert {"eval/oracle", "eval_long/oracle"} <= set(grpo[run]["after"])
    assert len(grpo[run]["curves"]["train/reward_oracle"]) == config.quickstart.grpo.train.steps
  assert "Flow-GRPO's long prompts collapse" in report and (tmp_path / "gold_vs_proxy.png").exists()
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["topk"].keys() == results["topk"].keys()

  # A rerun finds every run done: nothing is trained again and the results are the same.
  stamps = {
    d: os.path.getmtime(tmp_path / d / "summary.json")
    for d in ("seed_0/quickstart", "seed_0/grpo_flow", "topk/k6")
  }
  again = reproduce.run(config, str(tmp_path))
  assert again["rewards"] == results["rewards"] and again["topk"] == results["topk"]
  for d, stamp in stamps.items():
    assert os.path.getmtime(tmp_path / d / "summary.json") == stamp


def test_bad_config_is_named_before_anything_runs(tmp_path):
  config = load_config("configs/reproduce_synthetic.py", "smoke")
  config.topk.seed = 7
  with pytest.raises(ValueError, match="topk.seed 7 is not one of seeds"):
    reproduce.run(config, str(tmp_path / "a"))
  config = load_config("configs/reproduce_synthetic.py", "smoke")
  config.reward_variants = dict(typo=dict(los="bt"))
  with pytest.raises(ValueError, match="override 'los' is not a field"):
    reproduce.run(config, str(tmp_path / "b"))
