import numpy as np
import pytest

from spatial_jax.configs_lib import load_config
from spatial_jax.data import oracle, perturb, render, scenes
from spatial_jax.rl import rewards


def test_brightness_is_the_mean_pixel_value():
  images = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)])
  np.testing.assert_allclose(rewards.brightness_reward(images, ["a", "b"]), [0.0, 1.0])


def test_soft_oracle_grades_layouts_like_the_oracle():
  prompt = "a red circle left of a blue square"
  scene = scenes.parse_prompt(prompt)
  image = render.render_scene(scene, size=32, seed=0)
  flipped = perturb.perturb_prompt(prompt, seed=0)
  soft = rewards.oracle_soft_reward(np.stack([image, image]), [prompt, flipped])
  hard = rewards.oracle_reward(np.stack([image, image]), [prompt, flipped])
  assert hard.tolist() == [1.0, 0.0]
  assert soft[0] > 0.5 > soft[1]  # Past the margin on the right side / on the wrong side.
  # A missing object scores 0.
  blank = np.full((32, 32, 3), 128, np.uint8)
  assert rewards.oracle_soft_reward(blank[None], [prompt])[0] == 0.0
  result = oracle.check_scene(image, scene)
  assert oracle.soft_fraction(result, scene, sharpness=1e6) == pytest.approx(result.fraction)


def test_make_rewards_names_a_missing_reward():
  config = load_config("configs/grpo_synthetic.py")
  config.reward.train_on = "spatial_score"
  with pytest.raises(ValueError, match="config.reward.spatial_score"):
    rewards.make_rewards(config, mesh=None)
  config.reward.train_on = "nonsense"
  with pytest.raises(ValueError, match="use one of"):
    rewards.make_rewards(config, mesh=None)


def test_objects_reward_is_the_fraction_of_objects_found():
  prompt = "a red circle left of a blue square"
  image = render.render_scene(scenes.parse_prompt(prompt), size=32, seed=0)
  blank = np.full((32, 32, 3), 128, np.uint8)
  half = image.copy()
  half[oracle.color_labels(image) == oracle._PALETTE_NAMES.index("blue")] = 128
  got = rewards.objects_reward(np.stack([image, half, blank]), [prompt] * 3)
  assert got.tolist() == [1.0, 0.5, 0.0]


def test_reward_weights_and_scorers():
  config = load_config("configs/grpo_synthetic.py")
  assert rewards.reward_weights(config) == {"oracle": 1.0}  # Every weight 0: train_on.
  config.reward.weights.update(oracle_soft=1.0, objects=0.5)
  assert rewards.reward_weights(config) == {"oracle_soft": 1.0, "objects": 0.5}
  config.reward.scorers = {"bright": "spatial_jax.rl.rewards:brightness_reward"}
  config.reward.weights.bright = 0.1
  fns = rewards.make_rewards(config, mesh=None)
  assert {"oracle", "oracle_soft", "objects", "bright"} <= set(fns)
  images = np.full((2, 4, 4, 3), 51, np.uint8)
  np.testing.assert_allclose(fns["bright"](images, ["", ""]), [0.2, 0.2])
  config.reward.weights.update(objects=0.0, oracle_soft=1.0)
  assert "objects" not in rewards.make_rewards(config, mesh=None)  # Computed when weighted.
  config.reward.weights.objects = -1.0
  with pytest.raises(ValueError, match="weights must be >= 0"):
    rewards.reward_weights(config)
  config.reward.weights.objects = 0.0
  config.reward.aggregate = "max"
  with pytest.raises(ValueError, match="reward.aggregate"):
    rewards.reward_weights(config)
  for path in ("no_colon", "spatial_jax.rl.rewards:missing", "no_such_module:fn"):
    with pytest.raises(ValueError, match="scorers"):
      rewards.load_scorer(path)
  config.reward.aggregate = "sum"
  config.reward.oracle = False
  with pytest.raises(ValueError, match="'oracle_soft' reward drives training"):
    rewards.make_rewards(config, mesh=None)
