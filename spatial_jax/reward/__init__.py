"""SpatialScore: the reward model, its training, evaluation and inference."""

from spatial_jax.reward.inference import SpatialScore

__all__ = ["SpatialScore"]
