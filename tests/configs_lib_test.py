"""Config-arg parsing, the job registry and multi-process detection."""

import pytest

from spatial_jax import configs_lib, main, registry


def test_parse_arg_types_and_bare_flags():
  arg = configs_lib.parse_arg("smoke,size=128,lr=0.5", smoke=False, size=64, lr=1.0, name="x")
  assert arg.smoke is True and arg.size == 128 and arg.lr == 0.5 and arg.name == "x"
  assert configs_lib.parse_arg(None, smoke=False).smoke is False
  assert configs_lib.parse_arg("smoke=false", smoke=True).smoke is False


@pytest.mark.parametrize(
  "arg, message",
  [
    ("smok", "Unknown config arg 'smok'"),
    ("size=big", "size='big' is not a int"),
    ("size", "needs a value"),
    ("smoke=maybe", "not a boolean"),
  ],
)
def test_parse_arg_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    configs_lib.parse_arg(arg, smoke=False, size=64)


def test_registry_unknown_job_lists_known_ones():
  with pytest.raises(ValueError, match=r"Unknown job 'nope'.*data_synthetic"):
    registry.get_job("nope")
  assert callable(registry.get_job("data_synthetic"))


@pytest.mark.parametrize(
  "environ, expected",
  [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS=4"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE=2"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, "TPU_WORKER_HOSTNAMES=w0,w1"),
    ({"SPATIAL_JAX_DISTRIBUTED": "0"}, None),
    ({"SPATIAL_JAX_DISTRIBUTED": "1"}, "SPATIAL_JAX_DISTRIBUTED=1"),
  ],
)
def test_multiprocess_detection(environ, expected):
  assert main.multiprocess_reason(environ) == expected


@pytest.mark.parametrize(
  "config_path, key, value",
  [
    ("configs/grpo_synthetic.py:smoke", "eval.num_prompts", 0),
    ("configs/grpo_synthetic.py:smoke", "grpo.prompts_per_step", -1),
    ("configs/sample.py:smoke", "num_prompts", 0),
    ("configs/sample.py:smoke", "images_per_prompt", 0),
    ("configs/reward_eval.py:smoke", "max_pairs", -1),
    ("configs/reward_synthetic.py:smoke", "eval.max_pairs", -1),
    ("configs/flux_sft_synthetic.py:smoke", "gallery.num_steps", 0),
  ],
)
def test_sizes_are_checked_before_anything_is_written(tmp_path, config_path, key, value):
  path, _, arg = config_path.partition(":")
  config = configs_lib.load_config(path, arg)
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  if config.job == "reward_eval":
    config.model_path = "oracle"
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=rf"config\.{key}={value} must be an integer >= \d"):
    registry.get_job(config.job)(config, str(workdir))
  assert not workdir.exists()


def test_topk_zero_keeps_every_sample_as_none_does():
  from spatial_jax.rl import loop

  config = configs_lib.load_config("configs/grpo_synthetic.py", "smoke")
  config.grpo.topk = 0  # What `--config.grpo.topk=0` sets; None cannot be typed there.
  assert loop.kept_topk(config) is None
  loop.check_config(config, batch_shards=8)
  config.grpo.topk = 5  # 2k > G = 8
  with pytest.raises(ValueError, match="None or 0 keeps all"):
    loop.check_config(config, batch_shards=8)
