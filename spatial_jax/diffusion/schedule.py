"""The flow-match schedule of FLUX: diffusers' FlowMatchEulerDiscreteScheduler, host side.

Sigmas run from 1 (noise) to 0 (data): `linspace(1, 1/N, N)`, shifted by the resolution-dependent
`mu` (a line through (256 tokens, 0.5) and (4096 tokens, 1.15); flux.md §1.9, §6) as
`e^mu / (e^mu + (1/sigma - 1))`, then a terminal 0. They depend only on the step count and the
image size, so they are computed once in numpy (float32, as diffusers) and passed into the jitted
sampler as an array.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


def calculate_shift(
  image_seq_len: int,
  base_seq_len: int = 256,
  max_seq_len: int = 4096,
  base_shift: float = 0.5,
  max_shift: float = 1.15,
) -> float:
  """diffusers' `calculate_shift`: mu on the line through the two anchors."""
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return image_seq_len * slope + base_shift - slope * base_seq_len


def time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
  """The exponential time shift with exponent 1: e^mu / (e^mu + (1/sigma - 1))."""
  return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


# Scheduler options that change the sigmas and that we do not implement.
_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@dataclasses.dataclass(frozen=True)
class FlowMatchSchedule:
  """The fields of a `scheduler/scheduler_config.json` that FLUX uses (FLUX.1-dev's values)."""

  num_train_timesteps: int = 1000
  shift: float = 3.0
  use_dynamic_shifting: bool = True
  base_shift: float = 0.5
  max_shift: float = 1.15
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096

  @classmethod
  def from_config(cls, config: dict[str, Any]) -> FlowMatchSchedule:
    """From a diffusers scheduler config dict; options that would change the sigmas in ways not
    implemented here are refused rather than ignored."""
    if config.get("_class_name", "FlowMatchEulerDiscreteScheduler") != (
      "FlowMatchEulerDiscreteScheduler"
    ):
      raise NotImplementedError(f"Scheduler {config['_class_name']!r}: only FlowMatchEuler")
    if used := [k for k in _UNSUPPORTED if config.get(k)]:
      raise NotImplementedError(f"Scheduler options {used} are not implemented")
    if config.get("time_shift_type", "exponential") != "exponential":
      raise NotImplementedError(f"time_shift_type={config['time_shift_type']!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})

  def mu(self, image_seq_len: int) -> float:
    return calculate_shift(
      image_seq_len,
      self.base_image_seq_len,
      self.max_image_seq_len,
      self.base_shift,
      self.max_shift,
    )

  def sigmas(self, num_steps: int, image_seq_len: int) -> np.ndarray:
    """(num_steps + 1,) float32 sigmas, the last one 0, as FluxPipeline sets them."""
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if self.use_dynamic_shifting:
      sigmas = time_shift(self.mu(image_seq_len), sigmas)
    else:
      sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
    return np.append(sigmas.astype(np.float32), np.float32(0.0))

  def timesteps(self, sigmas: np.ndarray) -> np.ndarray:
    """The scheduler's timesteps (sigma x 1000) for all but the terminal sigma."""
    return (sigmas[:-1] * self.num_train_timesteps).astype(np.float32)
