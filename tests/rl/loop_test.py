"""rl.loop: the public GRPO step phases the job, the colab, plan and the benchmark share."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from spatial_jax import sharding
from spatial_jax.configs_lib import load_config
from spatial_jax.diffusion import text_to_image
from spatial_jax.rl import loop, steps

PROMPTS = ["a red circle left of a blue square", "a green star above a yellow triangle"]


def test_merge_minibatch_metrics_reduces_each_metric_as_the_step_does():
  rows = [
    dict(loss=1.0, ratio_min=0.9, ratio_max=1.1, finite=True),
    dict(loss=3.0, ratio_min=0.7, ratio_max=1.05, finite=False),
  ]
  merged = loop.merge_minibatch_metrics(rows)
  assert merged == dict(loss=2.0, ratio_min=0.7, ratio_max=1.1, finite=False)
  assert set(steps.MIN_METRICS) == {"ratio_min"} and set(steps.MAX_METRICS) == {"ratio_max"}


@pytest.mark.slow  # A GRPO step: rollout, decode, two updates (~30 s).
def test_one_step_through_the_phases_on_a_two_device_mesh():
  """rollout -> score -> minibatches -> update on 2 CPU devices: the minibatches hold exactly
  the kept samples, split over the batch axis, and the update moves the LoRA params."""
  config = load_config("configs/grpo_synthetic.py", "smoke")
  config.reward.train_on = "brightness"
  config.grpo.update(prompts_per_step=2, group_size=4, topk=1)
  config.train.num_minibatches = 2
  mesh = sharding.make_mesh([("data", 2)], devices=jax.devices()[:2])
  rules = sharding.resolve_rules(None)
  loop.check_config(config, sharding.batch_shard_count(mesh, rules))
  policy = text_to_image.load_text_to_image(config, mesh, rules)
  graphdef, trainable, frozen = nnx.split(policy.transformer, nnx.LoRAParam, ...)
  tx = steps.make_optimizer(config)
  phases = loop.jit_phases(graphdef, trainable, frozen, policy, tx, config, mesh, rules)
  brightness = lambda images, prompts: np.asarray(images, np.float32).mean(axis=(1, 2, 3))  # noqa: E731
  with sharding.use_mesh(mesh, rules):
    opt_state = jax.jit(tx.init)(trainable)
    roll = loop.rollout(phases, policy, trainable, frozen, PROMPTS, jax.random.key(0))
    scored = loop.score(phases, roll, {"brightness": brightness}, config)
    batches = loop.minibatches(phases, roll, scored, config, step=1)
    before = jax.tree.map(np.asarray, trainable)
    trainable, opt_state, aux = loop.update(phases, trainable, opt_state, frozen, batches)

  assert roll.images.shape[0] == len(roll.group_prompts) == 8
  np.testing.assert_allclose(scored.reward.reshape(-1), brightness(roll.images, None), rtol=1e-6)
  mask = np.asarray(scored.mask)
  assert mask.shape == (2, 4) and mask.sum(axis=1).tolist() == [2, 2]  # Top-1 and bottom-1.
  # The kept samples, each once, in 2 minibatches of 2, each split over the 2 devices.
  kept_advantages = np.sort(np.asarray(scored.advantages).reshape(-1)[mask.reshape(-1)])
  got = np.sort(np.concatenate([np.asarray(b["advantages"]) for b in batches]))
  np.testing.assert_array_equal(got, kept_advantages)
  for batch in batches:
    assert batch["latents"].shape[1] == 2
    assert set(batch) == {*loop.batch_keys(config), "timesteps"}
    for name in loop.batch_keys(config):
      x, axis = batch[name], loop.BATCH_AXES[name]
      assert x.sharding.shard_shape(x.shape)[axis] == x.shape[axis] // 2, (name, x.sharding)
    assert batch["timesteps"].sharding.is_fully_replicated
  assert aux["finite"]
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), trainable, before)
  assert max(jax.tree.leaves(moved)) > 0
  scalars = loop.step_scalars(aux, scored)
  assert scalars["train/kept_fraction"] == 0.5
  assert np.isclose(scalars["train/reward_brightness"], np.mean(scored.rewards["brightness"]))
  assert "train/pair_agreement_with_oracle" not in scalars  # No ground truth among the rewards.
  # With the oracle among the rewards, the trained reward's ranking is judged against it.
  b = scored.rewards["brightness"]
  for oracle, expected in ((b, 1.0), (-b, 0.0)):
    judged = dataclasses.replace(scored, rewards={"brightness": b, "oracle": oracle})
    assert loop.step_scalars(aux, judged)["train/pair_agreement_with_oracle"] == expected


def test_proxy_rises_gold_falls():
  rises, falls, flat = [1.0, 1.0, 2.0, 2.0], [0.9, 0.9, 0.5, 0.5], [0.9, 0.9, 0.9, 0.89]
  assert loop.proxy_rises_gold_falls(rises, falls, window=2, tolerance=0.02)
  assert not loop.proxy_rises_gold_falls(rises, flat, window=2, tolerance=0.02)  # Within tol.
  assert not loop.proxy_rises_gold_falls(falls, falls, window=2, tolerance=0.02)  # Proxy fell.
  assert not loop.proxy_rises_gold_falls(rises[1:], falls[1:], window=2, tolerance=0.02)
  assert not loop.proxy_rises_gold_falls(rises, falls, window=0, tolerance=0.02)
  # Only the last 2 x window values count.
  assert loop.proxy_rises_gold_falls([5.0, *rises], [0.0, *falls], window=2, tolerance=0.02)
