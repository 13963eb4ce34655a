"""rl.steps' stochastic windows (fixed, Flow-GRPO-Fast branching, MixGRPO sliding) and the model
evaluations they cost."""

import pytest

from spatial_jax.configs_lib import load_config
from spatial_jax.rl import steps


def _config(**sampling):
  config = load_config("configs/grpo_synthetic.py", "smoke")
  config.sampling.update(sampling)
  return config


def test_sliding_window_moves_every_n_steps_and_wraps():
  config = _config(sde_window=(0, 4), sde_window_mode="sliding", sde_window_size=2)
  config.sampling.sde_window_every = 2
  config.sampling.num_steps = 10
  starts = [steps.sde_window(config, 10, step)[0] for step in range(1, 9)]
  assert starts == [0, 0, 1, 1, 2, 2, 0, 0]
  assert steps.trained_timesteps(config, 10, 3) == (1, 2)


def test_branch_window_start_is_random_per_step_and_reproducible():
  config = _config(sde_window=(1, 6), sde_window_mode="branch", sde_window_size=2)
  windows = [steps.sde_window(config, 10, step) for step in range(1, 41)]
  assert all(1 <= a and b == a + 2 and b <= 6 for a, b in windows)
  assert {a for a, _ in windows} == {1, 2, 3, 4}  # Every position occurs.
  assert windows == [steps.sde_window(config, 10, step) for step in range(1, 41)]
  config.seed = 1
  assert windows != [steps.sde_window(config, 10, step) for step in range(1, 41)]


def test_window_errors_name_the_field():
  with pytest.raises(ValueError, match="sde_window_size"):
    steps.sde_window(_config(sde_window_mode="branch"), 3)  # Size 0.
  with pytest.raises(ValueError, match="sde_window_mode"):
    steps.sde_window(_config(sde_window_mode="random"), 3)
  with pytest.raises(ValueError, match="sde_window="):
    steps.sde_window(_config(sde_window=(2, 5)), 3)


def test_model_evaluations_count_the_shared_prefix_once_per_group():
  # Smoke: P = 2 prompts x G = 8, 3 steps, true CFG (x2), KL (a reference forward), 8 kept.
  config = _config()
  assert steps.evaluations_per_step(config, 3, 1, kept=8, cfg=True) == {
    "nfe/rollout": 2 * 16 * 3,
    "nfe/train": 2 * 8 * 2 * 2,  # 2 trained steps (the window (0, 2)), policy + reference.
    "nfe/total": 96 + 64,
  }
  config = _config(sde_window=(1, 3), sde_window_mode="branch", sde_window_size=1)
  config.grpo.update(same_initial_noise=True, beta=0.0)
  step = next(s for s in range(1, 20) if steps.sde_window(config, 3, s) == (2, 3))
  nfe = steps.evaluations_per_step(config, 3, step, kept=8, cfg=False)
  assert nfe["nfe/rollout"] == 2 * 2 + 16 * 1  # Steps 0-1 once per group, step 2 per sample.
  assert nfe["nfe/train"] == 8
