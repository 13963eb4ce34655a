"""A markdown table of GRPO runs at chosen steps, from their workdirs' history.json.

  python docs/results/grpo_runs_table.py [--prefix eval] [--steps 0,80,160,240] NAME=WORKDIR ...

Each cell: relations / one changed / objects found / SpatialScore of the evaluation `--prefix`
(`eval`: the pool's held-out wordings or the held-out short prompts; `eval_fresh`, `eval_long`),
then the training time up to that step (rollout + reward + train phases, evaluations excluded)
and the model evaluations (`nfe/cumulative`). A step the run has not reached reads "-".
"""

import argparse
import json
import os

# (label, key under the prefix): what the oracle and the learned reward say of the eval images.
COLUMNS = (
  ("relations", "oracle"),
  ("one changed", "oracle_perturbed"),
  ("objects", "oracle_objects"),
  ("SpatialScore", "spatial_score"),
)
PHASE_TIMES = ("time/rollout_s", "time/reward_s", "time/train_s")


def _series(history, key):
  return {int(step): value for step, value in history.get(key, [])}


def cumulative_seconds(history, step):
  """Training time of steps 1..step (training steps are logged from 1): phase times summed."""
  total = 0.0
  for key in PHASE_TIMES:
    total += sum(v for s, v in _series(history, key).items() if s <= step)
  return total


def cell(history, prefix, step):
  values = [_series(history, f"{prefix}/{key}").get(step) for _, key in COLUMNS]
  if any(v is None for v in values):
    return "-"
  text = " / ".join(f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" for v in values)
  if step == 0:
    return text
  nfe = _series(history, "nfe/cumulative").get(step)
  nfe_text = f", {nfe / 1000:.0f}k NFE" if nfe is not None else ""
  return f"{text} ({cumulative_seconds(history, step):.0f} s{nfe_text})"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prefix", default="eval")
  parser.add_argument("--steps", default="0,80,160,240")
  parser.add_argument("runs", nargs="+", help="NAME=WORKDIR")
  args = parser.parse_args()
  steps = [int(s) for s in args.steps.split(",")]
  print("| run | " + " | ".join(f"step {s}" for s in steps) + " |")
  print("|---" * (len(steps) + 1) + "|")
  for run in args.runs:
    name, workdir = run.split("=", 1)
    with open(os.path.join(workdir, "history.json")) as f:
      history = json.load(f)
    print(f"| {name} | " + " | ".join(cell(history, args.prefix, s) for s in steps) + " |")


if __name__ == "__main__":
  main()
