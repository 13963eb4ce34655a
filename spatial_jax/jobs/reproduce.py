"""Job `reproduce`: the paper's tables in miniature, over seeds (configs/reproduce_synthetic.py).

  eval_pairs/                 held-out pairs, 1-3 relations changed (data_synthetic)
  seed_N/quickstart/          pairs, text encoder, SpatialScore, generator, GRPO on SpatialScore
  seed_N/reward_<variant>/    SpatialScore variants on the same pairs (reward_train)
  seed_N/eval/<reward>/       each reward on eval_pairs (reward_eval: eval.json)
  seed_N/grpo_flow/           Flow-GRPO*: the same GRPO driven by the rule-based oracle
  topk/<run>/                 the top-k ablation at G = 24 on one seed's models
  results.json, report.md, gold_vs_proxy.png

Every run is a job of its own in its own folder; one whose result file exists is done and kept,
an interrupted one resumes from its checkpoints, so rerunning the command continues.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import logging

from spatial_jax import configs_lib, fileio, metrics
from spatial_jax.jobs import quickstart
from spatial_jax.jobs import reproduce_report as report_lib

# Rewards judged on the held-out pairs besides the variants: name -> model_path (None: the
# seed's quickstart SpatialScore).
REFERENCE_REWARDS = {"oracle": "oracle", "spatial_score": None, "untrained": "untrained"}
# The GRPO metrics the report compares, per held-out prompt set.
GRPO_METRICS = ("oracle", "oracle_perturbed", "oracle_objects", "spatial_score")
# The rollouts' rewards per step: the learned one (proxy) and the oracle (gold).
CURVE_KEYS = ("train/reward_spatial_score", "train/reward_oracle")


def _copy(config: Any) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


# Sub-dicts that override a model preset's fields: they name only the fields they change, so
# a new key is allowed there (the model's config class refuses an unknown one).
OPEN_FIELDS = ("model.vision", "model.text")


def _merge(config: ml_collections.ConfigDict, overrides: Any, path: str = "") -> Any:
  """`config` with `overrides` (nested dicts) set field by field; an unknown field is an error."""
  for key, value in dict(overrides).items():
    if key not in config and path not in OPEN_FIELDS:
      raise ValueError(f"reproduce: override {key!r} is not a field of {sorted(config)}")
    sub = f"{path}.{key}" if path else key
    if isinstance(value, dict | ml_collections.ConfigDict) and isinstance(
      config.get(key), ml_collections.ConfigDict
    ):
      _merge(config[key], value, sub)
    else:
      config[key] = value
  return config


def _grpo_config(qs_config: Any, seed: int, models: str, overrides: Any) -> Any:
  """The quickstart's GRPO stage on the models of the quickstart in `models`, with overrides."""
  config = _merge(_copy(qs_config.grpo), overrides)
  config.seed = seed
  config.model.generator = os.path.join(models, "generator", "final")
  config.reward.spatial_score = os.path.join(models, "reward")
  return config


def _history(folder: str) -> dict[str, list[tuple[int, float]]]:
  rows = quickstart.read_summary(folder, "history.json") or {}
  return {k: [(int(s), float(v)) for s, v in rows.get(k, [])] for k in (*CURVE_KEYS, "nfe/train")}


def _grpo_result(summary: dict[str, Any], folder: str, steps: int) -> dict[str, Any]:
  """What the report reads of one GRPO run: held-out before/after, curves, cost per step."""
  history = _history(folder)
  nfe = [v for _, v in history.pop("nfe/train")]
  return dict(
    before=summary["before"],
    after=summary["after"],
    curves=history,
    train_nfe_per_step=sum(nfe) / max(len(nfe), 1),
    seconds_per_step=summary.get("train_seconds", 0.0) / max(steps, 1),
  )


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Runs every stage (see the module docstring), then writes results.json and report.md."""
  from spatial_jax.jobs import data_synthetic, grpo, reward_eval, reward_train

  if not config.seeds:
    raise ValueError("config.seeds is empty: give at least one seed")
  if config.topk.seed not in config.seeds:
    raise ValueError(f"config.topk.seed {config.topk.seed} is not one of seeds {config.seeds}")
  # Every override is tried on a copy first: a misspelled field stops the job before any run.
  for overrides in config.reward_variants.values():
    _merge(_copy(config.quickstart.reward), overrides)
  _merge(_copy(config.quickstart.grpo), config.flow_grpo)
  for overrides in config.topk.runs.values():
    _merge(_copy(config.quickstart.grpo.grpo), overrides)
  os.makedirs(workdir, exist_ok=True)
  metrics.write_config_json(workdir, config)
  eval_pairs = os.path.join(workdir, "eval_pairs")
  quickstart.run_stage(
    workdir, "eval_pairs", data_synthetic.run, _copy(config.eval_pairs), "stats.json"
  )
  results: dict[str, Any] = dict(seeds=list(config.seeds), rewards={}, grpo={}, topk={})
  for seed in config.seeds:
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    qs_config = _copy(config.quickstart)
    qs_config.seed = seed
    quickstart.run_stage(seed_dir, "quickstart", quickstart.run, _copy(qs_config))
    models = os.path.join(seed_dir, "quickstart")
    rewards = {k: v or os.path.join(models, "reward") for k, v in REFERENCE_REWARDS.items()}
    for name, overrides in config.reward_variants.items():
      reward_config = _merge(_copy(qs_config.reward), overrides)
      reward_config.seed = seed
      if "data" not in overrides:  # The quickstart's pairs; a data override builds its own.
        reward_config.data.pairs = os.path.join(models, "reward", "pairs")
      quickstart.run_stage(seed_dir, f"reward_{name}", reward_train.run, reward_config)
      rewards[f"spatial_score_{name}"] = os.path.join(seed_dir, f"reward_{name}")
    for name, path in rewards.items():
      eval_config = configs_lib.load_config("configs/reward_eval.py")
      eval_config.update(model_path=path, pairs=eval_pairs, seed=seed)
      result, _ = quickstart.run_stage(
        os.path.join(seed_dir, "eval"), name, reward_eval.run, eval_config, "eval.json"
      )
      results["rewards"].setdefault(name, {})[str(seed)] = result
    steps = qs_config.grpo.train.steps
    flow_config = _grpo_config(qs_config, seed, models, config.flow_grpo)
    flow, _ = quickstart.run_stage(seed_dir, "grpo_flow", grpo.run, flow_config)
    ours = quickstart.read_summary(os.path.join(models, "grpo"))
    results["grpo"][str(seed)] = dict(
      spatial_score=_grpo_result(ours, os.path.join(models, "grpo"), steps),
      flow_grpo=_grpo_result(flow, os.path.join(seed_dir, "grpo_flow"), steps),
    )
  seed = config.topk.seed
  qs_config = _copy(config.quickstart)
  models = os.path.join(workdir, f"seed_{seed}", "quickstart")
  for name, overrides in config.topk.runs.items():
    topk_config = _grpo_config(
      qs_config, seed, models, dict(grpo=dict(group_size=config.topk.group_size, **overrides))
    )
    summary, _ = quickstart.run_stage(os.path.join(workdir, "topk"), name, grpo.run, topk_config)
    results["topk"][name] = dict(
      _grpo_result(summary, os.path.join(workdir, "topk", name), topk_config.train.steps),
      settings=dict(overrides),
      num_prompts=topk_config.eval.num_prompts,
      num_long_prompts=topk_config.eval.num_long_prompts,
    )
  results["group_size"] = config.topk.group_size
  results["eval_pairs"] = quickstart.read_summary(eval_pairs, "stats.json")
  metrics.write_summary(workdir, results, name="results.json")
  report_lib.plot_gold_vs_proxy(results, os.path.join(workdir, "gold_vs_proxy.png"))
  text = report_lib.render(results)
  fileio.write_atomic(os.path.join(workdir, "report.md"), text.encode())
  logging.info("reproduce: wrote %s\n%s", os.path.join(workdir, "report.md"), text)
  return results
