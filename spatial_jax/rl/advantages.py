"""Group-relative advantages with the paper's top-k / bottom-k filtering.

Each prompt is sampled G times; a sample's advantage is its reward normalised within its group
(grpo.md §1.5, Flow-GRPO's `PerPromptStatTracker`). The SpatialScore paper (grpo.md §4) keeps only
the top-k and bottom-k samples of each group, so that the trained trajectories are the ones the
noisy reward separates most clearly. Two orders of selection and normalisation exist (grpo.md §6.3):

- `stats="kept"` (the paper's figure: "reorder, select Top-K & Bottom-K, normalize"): select first,
  then normalise with the mean/std of the 2k kept samples.
- `stats="group"` (DanceGRPO's `bestofn`, grpo.md §2.1): normalise with the mean/std of all G
  samples first, then select; the kept samples are not renormalised.

`k=None` keeps every sample, so both orders reduce to Flow-GRPO's per-prompt normalisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_STATS = ("kept", "group")
_STD = ("group", "global")


def _topk_mask(rewards: jax.Array, k: int | None) -> jax.Array:
  """Boolean (P, G) mask of the k lowest and k highest rewards of each group.

  One stable ascending argsort ranks each group; the bottom-k are ranks [0, k) and the top-k are
  ranks [G - k, G). Using a single sort (rather than one ascending and one descending) keeps the two
  sets disjoint even when rewards tie, since 2k <= G. Ties are broken by index: among equal
  rewards the sample with the lower index ranks lower.
  """
  num_samples = rewards.shape[1]
  if k is None:
    return jnp.ones(rewards.shape, dtype=bool)
  order = jnp.argsort(rewards, axis=1, stable=True)
  # The inverse permutation gives each sample's rank within its group.
  ranks = jnp.argsort(order, axis=1, stable=True)
  return (ranks < k) | (ranks >= num_samples - k)


def _masked_mean(x: jax.Array, mask: jax.Array, axis: int | None) -> jax.Array:
  count = jnp.maximum(mask.sum(axis=axis, keepdims=True), 1)
  return jnp.where(mask, x, 0.0).sum(axis=axis, keepdims=True) / count


def _masked_std(x: jax.Array, mask: jax.Array, axis: int | None) -> jax.Array:
  # Population std (ddof=0), as np.std in Flow-GRPO's stat tracker.
  mean = _masked_mean(x, mask, axis)
  return jnp.sqrt(_masked_mean(jnp.square(x - mean), mask, axis))


def topk_group_advantages(
  rewards: jax.Array,
  k: int | None,
  *,
  stats: str = "kept",
  std: str = "group",
  eps: float = 1e-4,
  clip: float | None = 5.0,
) -> tuple[jax.Array, jax.Array]:
  """Per-group normalised advantages, keeping the top-k and bottom-k samples of each group.

  Order of top-k selection and normalisation (grpo.md §2.1, §4, §6.3):

  - `stats="kept"`: select the top-k and bottom-k by reward, then normalise each kept reward with
    the mean of its group's kept samples and the std of the kept samples (the paper's figure).
  - `stats="group"`: normalise with the mean and std of all G samples, then select (DanceGRPO).
    Selection by normalised advantage equals selection by reward, since normalising is monotone
    within a group.

  `std="group"` divides by the per-group std (of the kept samples or of the whole group, as
  above); `std="global"` divides by one std over the whole batch (over all kept samples when
  `stats="kept"`, over all P * G rewards when `stats="group"`), as Flow-GRPO's `global_std`
  (grpo.md §1.5: the std is around the batch mean, the mean is still per group). Stds are
  population stds (ddof=0). The advantage is `(r - mean) / (std + eps)`, clipped to
  `[-clip, clip]` (Flow-GRPO's `adv_clip_max`, grpo.md §1.4). A group whose kept rewards are all
  equal gets advantages 0.

  Ties: each group is ranked by one stable ascending argsort, bottom-k = the k lowest ranks and
  top-k = the k highest, so among equal rewards the lower index counts as lower. The selection is
  deterministic and the two sets never overlap.

  Args:
    rewards: (P, G) rewards, P prompts with G samples each.
    k: samples kept at each end of each group (static under jit); `None` keeps all G (Flow-GRPO's
      baseline). Requires `1 <= k` and `2 * k <= G`.
    stats: "kept" (select, then normalise) or "group" (normalise, then select).
    std: "group" (per-group std) or "global" (batch std).
    eps: added to the std, as Flow-GRPO's 1e-4.
    clip: advantages are clipped to [-clip, clip]; `None` disables clipping.

  Returns:
    `(advantages, mask)`: float (P, G) advantages (0 where dropped) and a bool (P, G) mask that is
    True for kept samples (exactly 2k per group, or all when `k is None`).

  Raises:
    ValueError: on a non-2-D `rewards`, an invalid `k`, or an unknown `stats` / `std`.
  """
  if stats not in _STATS:
    raise ValueError(f"stats must be one of {_STATS}, got {stats!r}")
  if std not in _STD:
    raise ValueError(f"std must be one of {_STD}, got {std!r}")
  rewards = jnp.asarray(rewards)
  rewards = rewards.astype(jnp.promote_types(rewards.dtype, jnp.float32))
  if rewards.ndim != 2:
    raise ValueError(f"rewards must have shape (P, G), got {rewards.shape}")
  num_samples = rewards.shape[1]
  if k is not None and (k < 1 or 2 * k > num_samples):
    raise ValueError(
      f"top-k filtering needs 1 <= k and 2 * k <= G (group size); got k={k}, G={num_samples}. "
      "Use k=None to keep every sample."
    )

  mask = _topk_mask(rewards, k)
  # The samples whose rewards define the statistics.
  stat_mask = mask if stats == "kept" else jnp.ones_like(mask)
  mean = _masked_mean(rewards, stat_mask, axis=1)
  if std == "group":
    scale = _masked_std(rewards, stat_mask, axis=1)
  else:
    scale = _masked_std(rewards, stat_mask, axis=None)
  advantages = (rewards - mean) / (scale + eps)
  if clip is not None:
    advantages = jnp.clip(advantages, -clip, clip)
  return jnp.where(mask, advantages, 0.0), mask


AGGREGATES = ("advantage", "sum")


def aggregate_rewards(
  rewards: dict[str, jax.Array], weights: dict[str, float], aggregate: str, eps: float = 1e-4
) -> jax.Array:
  """Several rewards of a rollout as the one (P, G) reward that the group advantages take.

  - `aggregate="sum"`: the weighted sum of the raw rewards (Flow-GRPO's multi-reward sum).
  - `aggregate="advantage"`: each reward normalised within its group first,
    `(r - mean_g) / (std_g + eps)`, then the weighted sum (MixGRPO's `advantage_aggr`, GDPO), so a
    reward's weight does not depend on its scale or spread; a group where a reward is constant
    contributes 0 for that reward.

  Args:
    rewards: name -> (P, G) rewards.
    weights: name -> weight, for the names to combine (each must be in `rewards`).
    aggregate: "advantage" or "sum".
    eps: added to each group std.

  Returns:
    The (P, G) float32 combined reward.

  Raises:
    ValueError: on an unknown `aggregate`, no weights, or a weighted reward that is missing.
  """
  if aggregate not in AGGREGATES:
    raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
  if not weights:
    raise ValueError("aggregate_rewards needs at least one weighted reward")
  missing = sorted(set(weights) - set(rewards))
  if missing:
    raise ValueError(f"rewards {missing} have weights but were not computed")
  total = None
  for name, weight in weights.items():
    r = jnp.asarray(rewards[name], jnp.float32)
    if aggregate == "advantage":
      all_samples = jnp.ones(r.shape, bool)
      r = (r - _masked_mean(r, all_samples, 1)) / (_masked_std(r, all_samples, 1) + eps)
    term = jnp.float32(weight) * r
    total = term if total is None else total + term
  return total


def group_pair_agreement(
  proxy: jax.Array, gold: jax.Array, worse: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """How often a (learned) reward orders a group's samples as a ground-truth one does.

  Over the pairs (i, j) of samples of one group with gold[i] > gold[j], the fraction with
  proxy[i] > proxy[j] (a tie counts as wrong), and the number of such pairs. All (P, G); `worse`
  (bool) keeps only the pairs whose worse sample j it marks, e.g. the images missing an object.
  The ranking within groups is all that GRPO's advantages take from a reward, so this is the
  proxy's accuracy where it matters; the fraction is nan when no pair counts."""
  proxy, gold = jnp.asarray(proxy, jnp.float32), jnp.asarray(gold, jnp.float32)
  ordered = gold[:, :, None] > gold[:, None, :]
  if worse is not None:
    ordered &= jnp.asarray(worse, bool)[:, None, :]
  agree = ordered & (proxy[:, :, None] > proxy[:, None, :])
  pairs = ordered.sum()
  return agree.sum() / pairs, pairs
