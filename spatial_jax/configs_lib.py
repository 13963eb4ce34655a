"""Helpers shared by the files in `configs/` (which are loaded by path).

The string after `:` in `--config configs/x.py:ARG` is parsed by `parse_arg`, in
the style of big_vision's `configs/common.py`: `:smoke`, `:smoke,size=128` or
`:size=128`. Unknown keys raise, so a typo never silently runs the default.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from spatial_jax import sharding


def _convert(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes", ""):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"Config arg {key}={text!r} is not a boolean.")
  if default is None:
    return text
  try:
    return type(default)(text)
  except ValueError as e:
    raise ValueError(f"Config arg {key}={text!r} is not a {type(default).__name__}.") from e


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses `arg` ("smoke,size=128") against `spec` (the keys and defaults).

  A bare word sets a boolean key to True (`smoke`); `key=value` is converted to
  the type of the key's default.

  Raises:
    ValueError: an unknown key (listing the known ones) or a malformed value.
  """
  values = dict(spec)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in spec:
      raise ValueError(f"Unknown config arg {key!r} in {arg!r}; known: {sorted(spec)}.")
    if not has_value and not isinstance(spec[key], bool):
      raise ValueError(f"Config arg {key!r} needs a value ({key}=...).")
    values[key] = _convert(key, text.strip(), spec[key]) if has_value else True
  return ml_collections.ConfigDict(values)


def base_config(job: str, *, seed: int = 0) -> ml_collections.ConfigDict:
  """Fields every job config has: the job name, seed, mesh and sharding rules."""
  config = ml_collections.ConfigDict()
  config.job = job
  config.seed = seed
  # Mesh over (data, fsdp, tensor); -1 takes the remaining devices.
  config.mesh = [list(axis) for axis in sharding.DEFAULT_MESH]
  # Overrides of sharding.DEFAULT_RULES as (logical_name, mesh_axes) pairs.
  config.sharding_rules = []
  return config


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads `configs/<exp>.py` by path, as `--config path:arg` does (for Colab and tests).

  A relative path is taken from the current directory, then from the repository root.
  """
  import importlib.util
  import os

  if not os.path.exists(path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, path)):
      path = os.path.join(root, path)
    else:
      raise FileNotFoundError(f"Config file not found: {path}")
  spec = importlib.util.spec_from_file_location("_spatial_jax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# The random tiny generator of smoke runs: flux_sft_synthetic:smoke's architecture.
TINY_GENERATOR = dict(
  max_length=80,
  scale_factor=2,
  t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4),
  clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
  flux=dict(
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    axes_dims_rope=(4, 4, 8),
    guidance_embeds=False,
  ),
)


def check_sizes(config: Any, minimums: dict[str, int]) -> None:
  """Raises a ValueError naming the first `config` size (a dotted key) below its minimum, so a
  zero or negative count fails before any work, not as a division by zero after training."""
  for key, minimum in minimums.items():
    value: Any = config
    for part in key.split("."):
      value = value[part]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      raise ValueError(f"config.{key}={value!r} must be an integer >= {minimum}.")


def flux_model(**overrides: Any) -> dict[str, Any]:
  """The `config.model` section of jobs that load a text-to-image policy (`diffusion.text_to_image`):
  `pipeline` (a diffusers FLUX folder) or `generator` (a synthetic generator folder); neither:
  the random tiny generator `tiny` (smoke runs). `overrides` replace or add fields."""
  import copy

  model = dict(
    pipeline="",
    generator="",
    max_sequence_length=512,  # T5 tokens (pipeline only).
    dtype="float32",
    param_dtype="float32",
    remat="none",
    attention_impl="",  # "cudnn" on NVIDIA GPUs.
    scan_layers=True,
    tiny=copy.deepcopy(TINY_GENERATOR),
  )
  model.update(overrides)
  return model


def grpo_sampling(num_steps: int, **overrides: Any) -> dict[str, Any]:
  """The `config.sampling` section of GRPO jobs: the rollout's schedule and its stochastic window
  (`rl.steps.sde_window`). `overrides` replace or add fields."""
  sampling = dict(
    num_steps=num_steps,  # Rollout steps on the FLUX schedule.
    guidance=1.0,  # The distilled guidance value (models with guidance embeddings).
    cfg_scale=-1.0,  # True CFG against the empty prompt; < 0: the generator's own setting.
    sde_type="sde",  # Flow-GRPO's Euler-Maruyama step, or "cps" (coefficients-preserving).
    sde_window=(),  # Steps [start, end) that may be stochastic; empty: all but the last (ODE).
    # "fixed": the whole window every step; "branch" (Flow-GRPO-Fast): `sde_window_size` steps at a
    # random start in it (ODE before: shared by a group with grpo.same_initial_noise); "sliding"
    # (MixGRPO): `sde_window_size` steps that move one step later every `sde_window_every` steps.
    sde_window_mode="fixed",
    sde_window_size=0,
    sde_window_every=1,
  )
  sampling.update(overrides)
  return sampling


def grpo_reward_mix(**overrides: Any) -> dict[str, Any]:
  """The fields of `config.reward` that say which rewards drive GRPO (`rl.rewards`)."""
  mix = dict(
    # name -> weight of the rewards that drive the advantages; all 0: `train_on` alone.
    weights=dict(spatial_score=0.0, oracle=0.0, oracle_soft=0.0, objects=0.0, brightness=0.0),
    aggregate="advantage",  # Normalise each reward in its group, then weight; or "sum".
    scorers={},  # Other rewards: name -> "module:function" (images, prompts) -> (N,) scores.
  )
  mix.update(overrides)
  return mix


def early_stop() -> dict[str, Any]:
  """`config.train.early_stop` of GRPO jobs: stop when, over the last `window` steps against the
  `window` before, the rollouts' `proxy` reward rose while the `gold` one fell by > `tolerance`."""
  return dict(window=0, proxy="spatial_score", gold="oracle", tolerance=0.02)
