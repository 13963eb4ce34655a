"""Pairwise evaluation of a reward model and its metrics.

Metrics on a pairs folder: accuracy overall, per relation type (`source.change_type`
when the pairs carry it), short (one relation) vs long prompts, one vs several relations
changed (`source.num_changes`, when a folder has both), the mean mu margin,
and accuracy per quartile of the pair's sigma (a calibration check: a well-calibrated
model is more often right where it is more certain).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spatial_jax.data import pairs

# Prompts of more words than this count as long when the pairs don't say how many
# relations a prompt has (the synthetic ones record `source.num_relations`).
LONG_PROMPT_WORDS = 15


@dataclasses.dataclass(frozen=True)
class EvalPair:
  chosen: np.ndarray
  rejected: np.ndarray
  prompt: str
  relation_type: str
  long_prompt: bool
  num_changes: int = 1


def _relation_type(record: pairs.PairRecord) -> str:
  if isinstance(record.source, dict) and "change_type" in record.source:
    return str(record.source["change_type"])
  return "all"


def _is_long(record: pairs.PairRecord) -> bool:
  if isinstance(record.source, dict) and "num_relations" in record.source:
    return int(record.source["num_relations"]) > 1
  return len(record.prompt.split()) > LONG_PROMPT_WORDS


def _num_changes(record: pairs.PairRecord) -> int:
  """Relations the rejected image reverses; 0 for a recoloured pair, 1 when not recorded."""
  if _relation_type(record) == "colour":
    return 0
  if isinstance(record.source, dict) and "num_changes" in record.source:
    return int(record.source["num_changes"])
  return 1


def load_eval_pairs(folder: str, split: str, *, max_pairs: int, image_size: int) -> list[EvalPair]:
  """Reads up to `max_pairs` (0: all) pairs of `split`, images resized to `image_size`."""
  records = pairs.read_pairs(folder, split=split)
  if not records:
    raise ValueError(f"No pairs with split {split!r} in {folder}")
  records = records[: max_pairs or None]
  size = pairs.image_size_hw(image_size)
  return [
    EvalPair(
      chosen=pairs.resize_rgb(pairs.load_rgb(os.path.join(folder, r.chosen)), size),
      rejected=pairs.resize_rgb(pairs.load_rgb(os.path.join(folder, r.rejected)), size),
      prompt=r.prompt,
      relation_type=_relation_type(r),
      long_prompt=_is_long(r),
      num_changes=_num_changes(r),
    )
    for r in records
  ]


@dataclasses.dataclass
class EvalResult:
  mu_chosen: np.ndarray
  mu_rejected: np.ndarray
  sigma_chosen: np.ndarray
  sigma_rejected: np.ndarray
  relation_type: list[str]
  long_prompt: np.ndarray
  num_changes: np.ndarray | None = None  # (N,) int; None: one change each.

  @property
  def correct(self) -> np.ndarray:
    return self.mu_chosen > self.mu_rejected

  def scalars(self) -> dict[str, float]:
    out = {
      "accuracy": float(self.correct.mean()),
      "margin": float(np.mean(self.mu_chosen - self.mu_rejected)),
      "sigma": float(np.mean(np.concatenate([self.sigma_chosen, self.sigma_rejected]))),
    }
    for name, mask in (("short", ~self.long_prompt), ("long", self.long_prompt)):
      if mask.any():
        out[f"accuracy_{name}"] = float(self.correct[mask].mean())
    if self.num_changes is not None and (self.num_changes > 1).any():
      for name, mask in (
        ("one_change", self.num_changes == 1),
        ("changes_2_3", self.num_changes > 1),
      ):
        if mask.any():
          out[f"accuracy_{name}"] = float(self.correct[mask].mean())
    for kind in sorted(set(self.relation_type)):
      mask = np.array([t == kind for t in self.relation_type])
      out[f"accuracy_{kind}"] = float(self.correct[mask].mean())
    return out

  def by_sigma_quartile(self) -> list[dict[str, float]]:
    """Accuracy per quartile of sqrt(sigma_w^2 + sigma_l^2), most certain first."""
    spread = np.sqrt(self.sigma_chosen**2 + self.sigma_rejected**2)
    order = np.argsort(spread, kind="stable")
    return [
      {
        "sigma_max": float(spread[part].max()),
        "accuracy": float(self.correct[part].mean()),
        "count": int(part.size),
      }
      for part in np.array_split(order, 4)
      if part.size
    ]

  def as_dict(self) -> dict[str, Any]:
    return {
      **self.scalars(),
      "num_pairs": int(self.correct.size),
      "by_sigma_quartile": self.by_sigma_quartile(),
    }

  def summary(self) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in self.scalars().items())


def score_in_chunks(
  score_inputs: Callable[[Any], tuple[Any, Any]],
  preparer: Any,
  images: Sequence[Any],
  prompts: Sequence[str],
  chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of each (image, prompt), in chunks of `chunk` sequences.

  The last chunk is padded with copies of its last row, so every call has one shape and the
  jitted scorer compiles once.
  """
  mus, sigmas = [], []
  for start in range(0, len(images), chunk):
    batch, texts = list(images[start : start + chunk]), list(prompts[start : start + chunk])
    real = len(batch)
    batch += [batch[-1]] * (chunk - real)
    texts += [texts[-1]] * (chunk - real)
    mu, sigma = score_inputs(preparer(batch, texts))
    mus.append(np.asarray(mu, np.float32)[:real])
    sigmas.append(np.asarray(sigma, np.float32)[:real])
  return np.concatenate(mus), np.concatenate(sigmas)


def evaluate(
  score: Callable[[Any], tuple[Any, Any]],
  preparer: Any,
  eval_pairs: Sequence[EvalPair],
  config: Any,
) -> EvalResult:
  """Scores every pair's chosen and rejected image against its prompt."""
  n = len(eval_pairs)
  images = [p.chosen for p in eval_pairs] + [p.rejected for p in eval_pairs]
  prompts = [p.prompt for p in eval_pairs] * 2
  mu, sigma = score_in_chunks(score, preparer, images, prompts, 2 * config.eval.batch_size)
  return EvalResult(
    mu_chosen=mu[:n],
    mu_rejected=mu[n:],
    sigma_chosen=sigma[:n],
    sigma_rejected=sigma[n:],
    relation_type=[p.relation_type for p in eval_pairs],
    long_prompt=np.array([p.long_prompt for p in eval_pairs]),
    num_changes=np.array([p.num_changes for p in eval_pairs]),
  )
