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
