"""The quickstart: every stage runs into one workdir, report.md is written, a rerun skips."""

import json
import os

import pytest

from spatial_jax.configs_lib import load_config
from spatial_jax.diffusion import synthetic
from spatial_jax.jobs import quickstart

pytestmark = pytest.mark.slow  # End to end: every stage of the quickstart.


def test_smoke_runs_every_stage_writes_the_report_and_a_rerun_skips(tmp_path):
  config = load_config("configs/quickstart.py", "smoke")
  report = quickstart.run(config, str(tmp_path))
  for stage in quickstart.STAGES:
    assert os.path.isdir(tmp_path / stage), stage
  assert all(report["seconds"][stage] > 0 for stage in quickstart.STAGES)
  # GRPO used the trained SpatialScore and the flux_sft generator of this workdir.
  grpo_config = json.loads((tmp_path / "grpo" / "config.json").read_text())
  assert grpo_config["reward"]["spatial_score"] == str(tmp_path / "reward")
  assert grpo_config["model"]["generator"] == str(tmp_path / "generator" / "final")
  assert grpo_config["reward"]["train_on"] == "oracle_soft" and grpo_config["data"]["scene_pool"]
  # The generator read the T5 the text-encoder stage pretrained.
  generator_config = json.loads((tmp_path / "generator" / "config.json").read_text())
  assert generator_config["text"]["t5_pretrained"] == str(tmp_path / "text_encoder" / "final")
  encoders = tmp_path / "generator" / "final" / "text_encoders" / synthetic.ENCODERS_CONFIG
  assert json.loads(encoders.read_text())["t5_pretrained"] == str(
    tmp_path / "text_encoder" / "final"
  )
  # The pool's scenes in held-out wordings (eval/) and fresh scenes (eval_fresh/).
  metrics = ("oracle", "oracle_objects", "oracle_perturbed", "oracle_soft", "spatial_score")
  # Besides these, short (one-relation) and long prompts separately where a set has them.
  by_length = tuple(f"oracle_{n}{s}" for n in ("short", "long") for s in ("", "_perturbed"))
  required = {f"{prefix}/{m}" for prefix in ("eval", "eval_fresh") for m in metrics}
  optional = {f"{prefix}/{m}" for prefix in ("eval", "eval_fresh") for m in by_length}
  assert required <= set(report["grpo"]["after"]) <= required | optional
  text = (tmp_path / "report.md").read_text()
  assert "| eval/oracle |" in text and "| eval_fresh/oracle |" in text
  assert "Held-out pairwise accuracy: 0." in text and "a pool of 2 scenes" in text
  probe = report["text_encoder"]["probe"]["pretrained"]
  assert f"| pretrained | {probe['x']:.3f} | {probe['y']:.3f} | {probe['colour']:.3f} |" in text
  # The held-out curve: the evaluation before training (step 0) and after the last step.
  curve = report["grpo_curve"]
  assert curve["eval/oracle"] == [
    (0, report["grpo"]["before"]["eval/oracle"]),
    (2, report["grpo"]["after"]["eval/oracle"]),
  ]
  after = report["grpo"]["after"]
  assert "| 2 | " + " | ".join(f"{after[k]:.3f}" for k in sorted(after)) + " |" in text

  again = quickstart.run(load_config("configs/quickstart.py", "smoke"), str(tmp_path))
  assert again["seconds"] == {stage: 0.0 for stage in quickstart.STAGES}
  assert again["grpo"]["after"] == report["grpo"]["after"]
