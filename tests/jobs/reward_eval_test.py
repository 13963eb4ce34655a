"""Job `reward_eval`: eval.json from a training workdir, the oracle reference, bad config."""

import json
import os

import ml_collections
import numpy as np
import pytest

from spatial_jax import checkpoint, metrics
from spatial_jax.configs_lib import load_config
from spatial_jax.data import pairs
from spatial_jax.jobs import data_synthetic, reward_eval
from spatial_jax.reward.inference import SpatialScore

pytestmark = pytest.mark.slow  # End to end: built on a reward_train run.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A reward_train workdir as training leaves it (config.json, pairs/, tokenizer/, a checkpoint).

  The checkpoint holds a freshly initialised model: the job only reads it back, and a real
  training run (tested in inference_test.py) would double this file's time.
  """
  workdir = str(tmp_path_factory.mktemp("reward"))
  config = load_config("configs/reward_synthetic.py", "smoke")
  config.data.synthetic.update(num_train=4, num_test=12, gallery_pairs=2)
  metrics.write_config_json(workdir, config)
  data = ml_collections.ConfigDict(dict(config.data.synthetic))
  data.seed = config.seed
  data_synthetic.run(data, os.path.join(workdir, "pairs"))
  scorer = SpatialScore.from_config(config, workdir=workdir)
  with checkpoint.Checkpointer(workdir) as ckpt:
    ckpt.save(1, params=scorer.trainable, force=True)
  return workdir, scorer


def _eval_config(model_path, **fields):
  config = load_config("configs/reward_eval.py", "smoke")
  config.model_path = model_path
  config.update(fields)
  return config


def _read(path):
  with open(path) as f:
    return json.load(f)


def test_eval_json_matches_accuracy_computed_from_score(workdir, tmp_path):
  model_dir, scorer = workdir
  config = _eval_config(model_dir, batch_size=4, max_pairs=10)  # 3 chunks, the last padded.
  reward_eval.run(config, str(tmp_path))
  result = _read(tmp_path / "eval.json")
  pairs_dir = os.path.join(model_dir, "pairs")  # The default: the workdir's own pairs.
  assert (result["model_path"], result["pairs"], result["split"]) == (model_dir, pairs_dir, "test")
  assert result["count"] == result["num_pairs"] == 10 and result["step"] == 1

  records = pairs.read_pairs(pairs_dir, split="test")[:10]
  load = lambda name: pairs.load_rgb(os.path.join(pairs_dir, name))  # noqa: E731
  prompts = [r.prompt for r in records]
  mu_w, _ = scorer.score([load(r.chosen) for r in records], prompts)
  mu_l, _ = scorer.score([load(r.rejected) for r in records], prompts)
  assert result["accuracy"] == float(np.mean(mu_w > mu_l))
  np.testing.assert_allclose(result["margin"], np.mean(mu_w - mu_l), atol=1e-5)
  assert sum(q["count"] for q in result["by_sigma_quartile"]) == 10


def test_oracle_is_exact_on_synthetic_pairs(workdir, tmp_path):
  pairs_dir = os.path.join(workdir[0], "pairs")
  reward_eval.run(_eval_config("oracle", pairs=pairs_dir, max_pairs=0), str(tmp_path))
  result = _read(tmp_path / "eval.json")
  assert result["count"] == 12 and result["step"] is None
  assert result["accuracy"] == 1.0 and result["sigma"] == 0.0 and result["margin"] > 0
  assert all(v == 1.0 for k, v in result.items() if k.startswith("accuracy"))


def test_bad_config_is_named(tmp_path):
  with pytest.raises(ValueError, match="config.model_path is empty"):
    reward_eval.run(_eval_config(""), str(tmp_path))
  with pytest.raises(ValueError, match="config.pairs is empty"):
    reward_eval.run(_eval_config("oracle"), str(tmp_path))
  assert not os.path.exists(tmp_path / "eval.json")
