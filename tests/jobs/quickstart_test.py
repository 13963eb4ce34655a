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
  config.seed = 3
  report = quickstart.run(config, str(tmp_path))
  # `--config.seed` seeds every stage.
  for stage in ("text_encoder", "reward", "generator", "grpo"):
    assert json.loads((tmp_path / stage / "config.json").read_text())["seed"] == 3, stage
  assert json.loads((tmp_path / "pairs" / "generator.json").read_text())["seed"] == 3
  for stage in quickstart.STAGES:
    assert os.path.isdir(tmp_path / stage), stage
  assert all(report["seconds"][stage] > 0 for stage in quickstart.STAGES)
  # GRPO used the trained SpatialScore and the flux_sft generator of this workdir.
  grpo_config = json.loads((tmp_path / "grpo" / "config.json").read_text())
  assert grpo_config["reward"]["spatial_score"] == str(tmp_path / "reward")
  assert grpo_config["model"]["generator"] == str(tmp_path / "generator" / "final")
  # Driven by the stage's own SpatialScore on fresh scenes (no pool); the oracle only judges.
  assert grpo_config["reward"]["train_on"] == "spatial_score"
  assert grpo_config["data"]["scene_pool"] == 0 and grpo_config["reward"]["oracle"]
  # GRPO samples unguided (the generator's own guidance is 2.0), and the tuned generator records
  # the guidance it was trained and evaluated with.
  base = json.loads((tmp_path / "generator" / "final" / "generator.json").read_text())
  tuned = json.loads((tmp_path / "grpo" / "final" / "generator.json").read_text())
  assert base["sampling"]["cfg_scale"] == 2.0
  assert grpo_config["sampling"]["cfg_scale"] == tuned["sampling"]["cfg_scale"] == 1.0
  # SpatialScore learned from its own folder: the shared relation pairs plus recoloured ones
  # (a named object missing); the generator's captions came from pairs/, which has none.
  assert json.loads((tmp_path / "reward" / "config.json").read_text())["data"]["pairs"] == ""
  own_stats = json.loads((tmp_path / "reward" / "pairs" / "stats.json").read_text())
  shared_stats = json.loads((tmp_path / "pairs" / "stats.json").read_text())
  assert own_stats["change_type"].get("colour", 0) > 0
  assert "colour" not in shared_stats["change_type"]
  rows = lambda folder: {r["id"]: r for r in map(json.loads, open(folder / "pairs.jsonl"))}  # noqa: E731
  own, shared = rows(tmp_path / "reward" / "pairs"), rows(tmp_path / "pairs")
  assert own.keys() == shared.keys()
  relation_ids = [i for i, r in own.items() if r["source"]["change_type"] != "colour"]
  assert 0 < len(relation_ids) < len(own)
  for i in relation_ids:
    assert (own[i]["prompt"], own[i]["perturbed_prompt"]) == (
      shared[i]["prompt"],
      shared[i]["perturbed_prompt"],
    )
  # The generator read the T5 the text-encoder stage pretrained.
  generator_config = json.loads((tmp_path / "generator" / "config.json").read_text())
  assert generator_config["text"]["t5_pretrained"] == str(tmp_path / "text_encoder" / "final")
  encoders = tmp_path / "generator" / "final" / "text_encoders" / synthetic.ENCODERS_CONFIG
  assert json.loads(encoders.read_text())["t5_pretrained"] == str(
    tmp_path / "text_encoder" / "final"
  )
  # Fresh held-out scenes (eval/), one-relation prompts: short only; and long prompts of the
  # full grammar (eval_long/), several relations each.
  metrics = ("oracle", "oracle_objects", "oracle_perturbed", "oracle_soft", "spatial_score")
  assert set(report["grpo"]["after"]) == {
    *(f"eval/{m}" for m in (*metrics, "oracle_short", "oracle_short_perturbed")),
    *(f"eval_long/{m}" for m in (*metrics, "oracle_long", "oracle_long_perturbed")),
  }
  text = (tmp_path / "report.md").read_text()
  assert "| eval/oracle |" in text and "eval_fresh" not in text and "a pool of" not in text
  assert "| eval_long | relations |" in text
  assert "a named object missing (recoloured) " in text
  assert "Held-out pairwise accuracy: 0." in text and "trained on the spatial_score reward" in text
  before, after = report["grpo"]["before"], report["grpo"]["after"]
  change = after["eval/oracle_objects"] - before["eval/oracle_objects"]
  assert (
    f"| eval | objects found | {before['eval/oracle_objects']:.3f} | "
    f"{after['eval/oracle_objects']:.3f} | {change:+.3f} |"
  ) in text
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

  config = load_config("configs/quickstart.py", "smoke")
  config.seed = 3
  again = quickstart.run(config, str(tmp_path))
  assert again["seconds"] == {stage: 0.0 for stage in quickstart.STAGES}
  assert again["grpo"]["after"] == report["grpo"]["after"]
