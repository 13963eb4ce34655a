"""Job `quickstart`: the synthetic world end to end, one stage after another in one workdir.

  pairs/         data_synthetic: (prompt, chosen, rejected) pairs
  text_encoder/  text_encoder_synthetic: the tiny T5 pretrained on the grammar, which the
                 generator reads (frozen), as FLUX reads T5-XXL
  reward/        reward_train: SpatialScore on the pairs
  generator/     flux_sft: the tiny FLUX base generator on the pairs' chosen images
  grpo/          grpo: the generator + LoRA fine-tuned with the configured reward
  report.md      what each stage reached and took, before/after GRPO, curves and galleries

Each stage is a job of its own with its own config section (`config.data`,
`config.text_encoder`, `config.reward`, `config.generator`, `config.grpo`: the stage configs of
configs/*.py); the quickstart only wires their folders together. A stage whose `summary.json` exists is done and is not rerun;
an interrupted stage resumes from its checkpoints, so rerunning the command continues.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging

from spatial_jax import fileio, metrics

STAGES = ("pairs", "text_encoder", "reward", "generator", "grpo")


def read_summary(folder: str, name: str = "summary.json") -> dict[str, Any] | None:
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_stage(workdir: str, name: str, run, config: Any, done_file: str = "summary.json"):
  """Runs one stage unless its summary exists; returns (summary, seconds of this call)."""
  folder = os.path.join(workdir, name)
  if (summary := read_summary(folder, done_file)) is not None:
    logging.info("stage %s is done (%s)", name, folder)
    return summary, 0.0
  logging.info("stage %s: running into %s", name, folder)
  start = time.time()
  summary = run(config, folder)
  return summary if isinstance(summary, dict) else read_summary(
    folder, done_file
  ), time.time() - start


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Runs the stages (see the module docstring) and writes report.md; returns its data."""
  from spatial_jax.jobs import data_synthetic, flux_sft, reward_train, text_encoder_synthetic
  from spatial_jax.jobs import grpo as grpo_job

  os.makedirs(workdir, exist_ok=True)
  # One seed for the whole world: `--config.seed` draws other pairs, initialisations and rollouts.
  for section in ("data", "text_encoder", "reward", "generator", "grpo"):
    config[section].seed = config.seed
  metrics.write_config_json(workdir, config)
  pairs = os.path.join(workdir, "pairs")
  seconds = {}
  _, seconds["pairs"] = run_stage(
    workdir, "pairs", data_synthetic.run, config.data, done_file="stats.json"
  )
  text_encoder, seconds["text_encoder"] = run_stage(
    workdir, "text_encoder", text_encoder_synthetic.run, config.text_encoder
  )
  if not config.reward.data.synthetic.get("recolour_fraction"):
    config.reward.data.pairs = pairs
  # else: the reward builds its own folder (reward/pairs) with recoloured pairs as well, which the
  # generator must not learn captions from (configs/quickstart.py).
  reward, seconds["reward"] = run_stage(workdir, "reward", reward_train.run, config.reward)
  config.generator.data.pairs = pairs
  config.generator.text.t5_pretrained = os.path.join(workdir, "text_encoder", "final")
  generator, seconds["generator"] = run_stage(workdir, "generator", flux_sft.run, config.generator)
  config.grpo.model.generator = os.path.join(workdir, "generator", "final")
  config.grpo.reward.spatial_score = os.path.join(workdir, "reward")
  grpo, seconds["grpo"] = run_stage(workdir, "grpo", grpo_job.run, config.grpo)

  report = dict(
    seconds={k: round(v, 1) for k, v in seconds.items()},
    text_encoder=text_encoder,
    reward=reward,
    generator=generator,
    grpo=grpo,
    grpo_curve=eval_curve(os.path.join(workdir, "grpo")),
  )
  text = render_report(report, config)
  fileio.write_atomic(os.path.join(workdir, "report.md"), text.encode())
  metrics.write_summary(workdir, report)
  logging.info("quickstart: wrote %s\n%s", os.path.join(workdir, "report.md"), text)
  return report


def eval_curve(grpo_dir: str) -> dict[str, list[tuple[int, float]]]:
  """The GRPO run's held-out evaluations by step (the `eval/*` and, with a scene pool or long
  held-out prompts, `eval_fresh/*` and `eval_long/*` rows of its history.json)."""
  rows = read_summary(grpo_dir, "history.json") or {}
  return {
    k: [(int(s), float(v)) for s, v in rows[k]]
    for k in sorted(rows)
    if k.startswith(("eval/", "eval_fresh/", "eval_long/"))
  }


def _curve_table(curve: dict[str, list[tuple[int, float]]]) -> list[str]:
  """Markdown rows: one per evaluated step, one column per metric."""
  names = [k for k in curve if curve[k]]
  by_step = {name: dict(curve[name]) for name in names}
  steps = sorted({s for name in names for s in by_step[name]})
  return [
    "| step | " + " | ".join(names) + " |",
    "|---|" + "---|" * len(names),
    *(f"| {s} | " + " | ".join(_fmt(by_step[n].get(s)) for n in names) + " |" for s in steps),
  ]


def _fmt(value: Any) -> str:
  return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)


# (row name, metric suffix) of the report's headline GRPO table; prefixed by each eval set.
_HEADLINE = (
  ("relations", "oracle"),
  ("one changed", "oracle_perturbed"),
  ("objects found", "oracle_objects"),
  ("SpatialScore", "spatial_score"),
)


def _headline_table(before: dict[str, float], after: dict[str, float]) -> list[str]:
  """Before -> after of the headline metrics per eval set, and per prompt length where the
  evaluation splits them (short: one relation; long: several)."""
  rows = ["| prompts | metric | before | after | change |", "|---|---|---|---|---|"]
  for prefix in sorted({k.split("/")[0] for k in after}):
    for length in ("", "_short", "_long"):
      for name, suffix in _HEADLINE:
        if length and suffix not in ("oracle", "oracle_perturbed"):
          continue  # Only the relation metrics are split by length.
        key = f"{prefix}/{suffix.replace('oracle', 'oracle' + length, 1)}"
        if key not in after or key not in before:
          continue
        change = after[key] - before[key]
        rows.append(
          f"| {prefix}{length.replace('_', ' ')} | {name} | {before[key]:.3f} | "
          f"{after[key]:.3f} | {change:+.3f} |"
        )
  return rows


def render_report(report: dict[str, Any], config: Any) -> str:
  """report.md: stage times, SpatialScore accuracy, the generator, GRPO before and after."""
  seconds = report["seconds"]
  reward_eval = (report.get("reward") or {}).get("eval", {})
  grpo = report.get("grpo") or {}
  before, after = grpo.get("before") or {}, grpo.get("after") or {}
  gen_gallery = (report.get("generator") or {}).get("gallery", {})
  probe = (report.get("text_encoder") or {}).get("probe", {})
  trained, random = probe.get("pretrained", {}), probe.get("random", {})
  lines = [
    "# Quickstart report: the synthetic world end to end",
    "",
    "Stage times on this machine (0 for a stage done by an earlier run of the command):",
    "",
    "| stage | seconds |",
    "|---|---|",
    *(f"| {stage} | {seconds.get(stage, 0.0):.0f} |" for stage in STAGES),
    f"| total | {sum(seconds.values()):.0f} |",
    "",
    "## Text encoder (text_encoder/)",
    "",
    "Probes of the frozen features at each colour word, held-out prompts: the sign of the",
    "object's place on each axis (linear) and its colour (nearest class mean):",
    "",
    "| T5 | x | y | colour |",
    "|---|---|---|---|",
    *(
      f"| {name} | " + " | ".join(_fmt(p.get(k)) for k in ("x", "y", "colour")) + " |"
      for name, p in (("pretrained", trained), ("random (for comparison)", random))
    ),
    "",
    "## SpatialScore (reward/)",
    "",
    f"Held-out pairwise accuracy: {_fmt(reward_eval.get('accuracy'))} "
    f"(untrained ~0.5, the oracle 1.0); horizontal relations "
    f"{_fmt(reward_eval.get('accuracy_horizontal'))}, vertical "
    f"{_fmt(reward_eval.get('accuracy_vertical'))}"
    + (
      f", a named object missing (recoloured) {_fmt(reward_eval['accuracy_colour'])}"
      if "accuracy_colour" in reward_eval
      else ""
    )
    + ". Curve: reward/learning_curve.png.",
    "",
    "## Base generator (generator/)",
    "",
    "The oracle on the gallery's held-out prompts (relations satisfied, objects found; the",
    "control scores each image against another prompt):",
    "",
    "| relations | objects | relations (control) | objects (control) |",
    "|---|---|---|---|",
    "| "
    + " | ".join(
      _fmt(gen_gallery.get(f"gallery/oracle_{k}"))
      for k in ("relations", "objects", "relations_control", "objects_control")
    )
    + " |",
    "",
    "Gallery: generator/gallery/ (samples above the reference renders).",
    "",
    f"## GRPO (grpo/), trained on the {config.grpo.reward.train_on} reward",
    "",
    *(
      [
        f"The run trains on a pool of {config.grpo.data.scene_pool} scenes. `eval/` rows hold",
        "those scenes out in other words (each relation stated from its other object);",
        "`eval_fresh/` rows are scenes it never trained on.",
        "",
      ]
      if config.grpo.data.get("scene_pool")
      else []
    ),
    "Deterministic (ODE) samples of the held-out prompts, before and after (relations: the",
    "fraction of a prompt's relations that hold; one changed: the same with one relation",
    "reversed, which a layout that ignores the words satisfies as often; objects found):",
    "",
    *_headline_table(before, after),
    "",
    "Every held-out metric:",
    "",
    "| metric | before | after |",
    "|---|---|---|",
    *(f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in sorted(after)),
    "",
    "The same held-out evaluation through training (step 0: before):",
    "",
    *_curve_table(report.get("grpo_curve") or {}),
    "",
    "Reward curve: grpo/curves.png. Galleries: grpo/gallery/step_000000.png (before) and the",
    f"last one, grpo/gallery/step_{grpo.get('step', 0):06d}.png (after).",
    "",
  ]
  return "\n".join(lines)
