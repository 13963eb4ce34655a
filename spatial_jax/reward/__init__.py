"""SpatialScore: the reward model, its training, evaluation, inference and service.

`SpatialScore` is imported on first use, so that `spatial_jax.reward.client` (numpy and PIL
only) works where JAX is not installed.
"""

from typing import Any

__all__ = ["SpatialScore"]


def __getattr__(name: str) -> Any:
  if name == "SpatialScore":
    from spatial_jax.reward.inference import SpatialScore

    return SpatialScore
  raise AttributeError(f"module 'spatial_jax.reward' has no attribute {name!r}")
