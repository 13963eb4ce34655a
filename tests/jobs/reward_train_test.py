"""The reward_train job: resume continues exactly, NaN stops cleanly, sharded step parity."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from spatial_jax import checkpoint, sharding
from spatial_jax.configs_lib import load_config
from spatial_jax.data import loader
from spatial_jax.jobs import data_synthetic, reward_train
from spatial_jax.reward import build, grounding
from spatial_jax.reward import step as reward_step
from spatial_jax.reward.model import trainable_filter

pytestmark = pytest.mark.slow  # End to end: reward_train job runs.


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
  config = load_config("configs/reward_synthetic.py", "smoke")
  data = config.data.synthetic
  data.seed = 0
  folder = str(tmp_path_factory.mktemp("pairs"))
  data_synthetic.run(data, folder)
  return folder


def _config(pairs_dir, **train):
  config = load_config("configs/reward_synthetic.py", "smoke")
  config.data.pairs = pairs_dir
  config.eval.max_pairs = 8
  config.train.update(train)
  return config


def _losses(workdir):
  with open(os.path.join(workdir, "history.json")) as f:
    return dict(json.load(f)["train/loss"])


def test_resume_continues_exactly_like_an_uninterrupted_run(pairs_dir, tmp_path):
  full = reward_train.run(_config(pairs_dir, steps=4), str(tmp_path / "full"))
  interrupted = str(tmp_path / "resumed")
  reward_train.run(_config(pairs_dir, steps=2), interrupted)
  assert checkpoint.Checkpointer(interrupted).latest_step() == 2
  resumed = reward_train.run(_config(pairs_dir, steps=4), interrupted)
  a, b = _losses(str(tmp_path / "full")), _losses(interrupted)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in (3, 4):
    np.testing.assert_allclose(b[step], a[step], rtol=1e-6)
  assert a[4] != a[3]  # The steps really differ (data and parameters move).
  assert resumed["eval"]["accuracy"] == full["eval"]["accuracy"]
  np.testing.assert_allclose(resumed["eval"]["margin"], full["eval"]["margin"], rtol=1e-5)


def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(pairs_dir, tmp_path):
  # Warmup makes step 1's learning rate 0 (a good checkpoint); step 2's huge rate overflows.
  config = _config(pairs_dir, steps=4, lr=1e38, warmup_steps=2, checkpoint_every=1)
  with pytest.raises(FloatingPointError, match="step 2.*last good checkpoint is step 1"):
    reward_train.run(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [1]
  mesh, rules = sharding.make_mesh(config.mesh), sharding.resolve_rules(None)
  model = build.build(config, str(tmp_path), mesh, rules).model
  _, target, _ = nnx.split(model, trainable_filter("all"), ...)
  params = ckpt.restore(step=1, params=target).params
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_sharded_train_step_equals_single_device(pairs_dir, tmp_path):
  # The smoke config trains on four rows per pair with the colour-grounding loss.
  config = _config(pairs_dir)
  assert config.train.perturbed_pairs and config.train.grounding_weight > 0
  rules = sharding.resolve_rules(None)
  batch = next(loader.make_pairs_loader(pairs_dir, batch_size=4, image_size=32, seed=0))
  results = []
  for mesh in (
    sharding.make_mesh([("data", 1)], devices=jax.devices()[:1]),
    sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)]),
  ):
    built = build.build(config, str(tmp_path / str(mesh.size)), mesh, rules)
    graphdef, trainable, frozen = nnx.split(built.model, trainable_filter("all"), ...)
    tx = reward_step.make_optimizer(config)
    colour_ids = grounding.colour_token_ids(built.tokenizer)
    step = reward_step.make_train_step(graphdef, tx, config, jax.random.key(0), colour_ids)
    with sharding.use_mesh(mesh, rules):
      pairs = build.global_pair_inputs(built.preparer, batch, mesh, rules, config)
      opt_state = jax.jit(tx.init)(trainable)
      new, _, aux = jax.jit(step)(trainable, opt_state, frozen, pairs, 1)
    assert pairs.rows_per_pair == 4 and pairs.inputs.input_ids.shape[0] == 16
    if mesh.size == 8:
      assert pairs.inputs.input_ids.sharding.spec[0] == ("data", "fsdp")
      assert pairs.centroids.sharding.spec[0] == ("data", "fsdp")
    assert aux["grounding_loss"] > 0 and aux["text_contrast_loss"] > 0
    results.append((jax.device_get(aux), jax.device_get(new)))
  (aux_1, new_1), (aux_8, new_8) = results
  for name in ("loss", "grounding_loss", "text_contrast_loss"):
    np.testing.assert_allclose(aux_8[name], aux_1[name], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new_1), jax.tree.leaves(new_8), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_init_from_starts_from_a_trained_spatial_score(pairs_dir, tmp_path):
  trained = reward_train.run(_config(pairs_dir, steps=4), str(tmp_path / "trained"))
  # Step 1's learning rate is 0 (warmup), so the fine-tuned model is its starting point.
  frozen_lr = dict(steps=1, warmup_steps=2)
  config = _config(pairs_dir, **frozen_lr)
  config.model.init_from = str(tmp_path / "trained")
  tuned = reward_train.run(config, str(tmp_path / "tuned"))
  scratch = reward_train.run(_config(pairs_dir, **frozen_lr), str(tmp_path / "scratch"))
  np.testing.assert_allclose(tuned["eval"]["margin"], trained["eval"]["margin"], rtol=1e-5)
  assert abs(scratch["eval"]["margin"] - trained["eval"]["margin"]) > 1e-3

  other = _config(pairs_dir, **frozen_lr)
  other.model.init_from = str(tmp_path / "trained")
  other.model.head_hidden = 24  # Not the trained model's architecture.
  with pytest.raises(ValueError, match="init_from=.*trained is not the architecture"):
    reward_train.run(other, str(tmp_path / "other"))


def test_loss_guard_reaches_the_job(pairs_dir, tmp_path):
  # A ratio below 1 makes any loss "explode" once 5 steps are logged: the guard is wired in.
  config = _config(pairs_dir, steps=6, checkpoint_every=2, max_loss_ratio=1e-9)
  with pytest.raises(checkpoint.DivergedError, match="reward training loss exploded at step 6"):
    reward_train.run(config, str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [2, 4]
