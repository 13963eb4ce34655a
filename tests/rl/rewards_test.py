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
