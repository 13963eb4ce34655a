import json
import os

import numpy as np
import pytest
from PIL import Image

from spatial_jax.configs_lib import load_config
from spatial_jax.data import render, scenes
from spatial_jax.data.prompts import synthetic_prompts
from spatial_jax.diffusion import generator as generator_lib
from spatial_jax.jobs import sample

pytestmark = pytest.mark.slow  # End to end: sample job runs.


def test_oracle_report_on_reference_renders_and_the_shuffled_control():
  prompts = synthetic_prompts(12, (5, 1))
  images = np.stack(
    [render.render_scene(scenes.parse_prompt(p), size=32, seed=i) for i, p in enumerate(prompts)]
  )
  report = generator_lib.oracle_report(images, prompts, per_prompt=1)
  assert report["all"]["relations"] == 1.0 and report["all"]["objects"] == 1.0
  assert report["all"]["relations_control"] < 1.0  # The renders do depend on their prompts.
  assert report["all"]["relations_perturbed"] < 1.0  # ... and on the relations in them.
  long = [len(scenes.parse_prompt(p).relations) > 1 for p in prompts]
  assert report["long"]["count"] == sum(long) and report["short"]["count"] == len(long) - sum(long)
  assert generator_lib.oracle_report(images[:1], ["a cat left of a dog"], 1) == {}  # Not grammar.


def test_smoke_samples_every_prompt_deterministically(tmp_path):
  config = load_config("configs/sample.py", "smoke")
  summary = sample.run(config, str(tmp_path / "a"))
  assert summary["prompts"] == 6 and summary["images_per_prompt"] == 2
  rows = [json.loads(line) for line in open(tmp_path / "a" / "samples.jsonl")]
  assert len(rows) == 6 and all(len(r["files"]) == 2 and len(r["oracle"]) == 2 for r in rows)
  metrics = json.loads(open(tmp_path / "a" / "metrics.json").read())
  assert metrics["oracle"]["all"]["count"] == 12
  grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
  assert grid.shape == (6 * 34 + 2, 2 * 34 + 2, 3)
  first = np.asarray(Image.open(tmp_path / "a" / rows[0]["files"][0]))
  second = np.asarray(Image.open(tmp_path / "a" / rows[0]["files"][1]))
  assert first.shape == (32, 32, 3) and (first != second).any()  # Distinct noise per image.

  # Batching does not change a sample: its noise depends on (seed, prompt, image) only.
  config.batch_size = 2
  sample.run(config, str(tmp_path / "b"))
  again = np.asarray(Image.open(tmp_path / "b" / rows[0]["files"][0]))
  assert np.abs(again.astype(int) - first.astype(int)).max() <= 1
  assert os.path.exists(tmp_path / "b" / "config.json")
